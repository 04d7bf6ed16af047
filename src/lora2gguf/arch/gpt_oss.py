"""GPT-OSS (gpt-oss-20b, gpt-oss-120b): `GptOssForCausalLM`, model_type `gpt_oss`.

Facts about the layouts (read from llama.cpp's converter and transformers' GptOssExperts):
- experts.gate_up_proj is (E, hidden, 2*intermediate) with gate and up interleaved along the last
  axis (gate = [..., 0::2], up = [..., 1::2]); GGUF wants ffn_gate_exps / ffn_up_exps of numpy
  shape (E, intermediate, hidden): transposed, then every other row. The LoRA factors follow:
  the B rows of gate are B's even rows, A is shared (layout.View.factors).
- experts.down_proj is (E, intermediate, hidden); GGUF's ffn_down_exps is (E, hidden, intermediate).
- PEFT can target the experts' biases too (target_parameters ``mlp.experts.gate_up_proj_bias``,
  ``down_proj_bias``: 2-D, one matrix each); gate_up_proj_bias is de-interleaved as gate_up_proj.
- self_attn.sinks has no `.weight` suffix in HF; GGUF names it attn_sinks.weight.
- the router (ffn_gate_inp) stays F32, as llama.cpp's converter and quantizer keep it.
- GGUF keys beyond every text model's: the sliding window and the expert width.
- the chat format is Harmony; a final answer ends with <|return|>, a tool call with <|call|>.
"""

from __future__ import annotations

import gguf

from ..layout import Copy, Split, Transpose
from . import Family, Rule, register


def _hparams(config, put) -> None:
    put("add_sliding_window", config["sliding_window"], "sliding_window")
    put("add_expert_feed_forward_length", config["intermediate_size"], "intermediate_size")


GPT_OSS = register(
    Family(
        name="gpt_oss",
        hf_architectures=("GptOssForCausalLM",),
        model_types=("gpt_oss",),
        gguf_arch=gguf.MODEL_ARCH.GPT_OSS,
        rules=(
            Rule("mlp.experts.gate_up_proj", Split(parts=2, interleaved=True, transpose=True),
                 ("mlp.experts.gate_proj.weight", "mlp.experts.up_proj.weight")),
            Rule("mlp.experts.gate_up_proj_bias", Split(parts=2, interleaved=True, axis="cols"),
                 ("mlp.experts.gate_proj.bias", "mlp.experts.up_proj.bias")),
            Rule("mlp.experts.down_proj", Transpose(), ("mlp.experts.down_proj.weight",)),
            Rule("mlp.experts.down_proj_bias", Copy(), ("mlp.experts.down_proj.bias",)),
            Rule("self_attn.sinks", Copy(), ("self_attn.sinks.weight",)),
        ),
        # GptOssConfig's defaults (transformers 5.x) for keys a saved config may leave out
        config_defaults={"max_position_embeddings": 131072, "rms_norm_eps": 1e-05, "sliding_window": 128,
                         "head_dim": 64, "num_experts_per_tok": 4, "num_local_experts": 128, "vocab_size": 201088,
                         "hidden_size": 2880, "intermediate_size": 2880, "num_attention_heads": 64,
                         "num_key_value_heads": 8, "num_hidden_layers": 36},
        hparams=_hparams,
        expert_params=("gate_up_proj", "down_proj"),
        wrapped_params=("gate_up_proj", "gate_up_proj_bias", "down_proj", "down_proj_bias"),
        f32_tensors=frozenset({gguf.MODEL_TENSOR.FFN_GATE_INP}),
        chat_format="harmony",
        eog_tokens=("<|return|>", "<|end|>", "<|call|>"),
        eos_token="<|return|>",
        checked="o200k_harmony BPE; BF16 and MXFP4 bases; LoRA on attention and experts; parity with "
                "llama.cpp's converter; logits vs transformers + PEFT",
    )
)
