"""GPT-OSS (gpt-oss-20b, gpt-oss-120b): `GptOssForCausalLM`, model_type `gpt_oss`.

Facts about the layouts:
- experts.gate_up_proj is (E, hidden, 2*intermediate) with gate and up interleaved along the last
  axis (gate = [..., 0::2], up = [..., 1::2]); GGUF wants ffn_gate_exps / ffn_up_exps of numpy
  shape (E, intermediate, hidden): split, then transpose.
- experts.down_proj is (E, intermediate, hidden); GGUF's ffn_down_exps is (E, hidden, intermediate).
- self_attn.sinks has no `.weight` suffix in HF; GGUF names it attn_sinks.weight.
- the router (ffn_gate_inp) stays F32, as llama.cpp's converter and quantizer keep it.
"""

from __future__ import annotations

import gguf

from .. import layout
from . import Architecture, Rule, register

GPT_OSS = register(
    Architecture(
        name="gpt_oss",
        hf_architectures=("GptOssForCausalLM",),
        model_type="gpt_oss",
        gguf_arch=gguf.MODEL_ARCH.GPT_OSS,
        rules=(
            Rule("mlp.experts.gate_up_proj", "transpose_split_interleaved",
                 ("mlp.experts.gate_proj.weight", "mlp.experts.up_proj.weight")),
            Rule("mlp.experts.gate_up_proj_bias", "split_interleaved",
                 ("mlp.experts.gate_proj.bias", "mlp.experts.up_proj.bias")),
            Rule("mlp.experts.down_proj", "transpose", ("mlp.experts.down_proj.weight",)),
            Rule("mlp.experts.down_proj_bias", "copy", ("mlp.experts.down_proj.bias",)),
            Rule("self_attn.sinks", "copy", ("self_attn.sinks.weight",)),
        ),
        transforms=layout.TRANSFORMS,
        expert_params=("gate_up_proj", "down_proj"),
        hparams=(
            ("add_block_count", ("num_hidden_layers",), True),
            ("add_context_length", ("max_position_embeddings",), True),
            ("add_embedding_length", ("hidden_size",), True),
            ("add_feed_forward_length", ("intermediate_size",), True),
            ("add_head_count", ("num_attention_heads",), True),
            ("add_head_count_kv", ("num_key_value_heads",), True),
            ("add_layer_norm_rms_eps", ("rms_norm_eps",), True),
            ("add_expert_count", ("num_local_experts",), True),
            ("add_expert_used_count", ("num_experts_per_tok", "experts_per_token"), True),
            ("add_key_length", ("head_dim",), True),
            ("add_value_length", ("head_dim",), True),
            ("add_sliding_window", ("sliding_window",), True),
            ("add_expert_feed_forward_length", ("intermediate_size",), True),
        ),
        f32_tensors=frozenset({gguf.MODEL_TENSOR.FFN_GATE_INP}),
        chat_format="harmony",
        eog_tokens=("<|return|>", "<|end|>", "<|call|>"),
        eos_token="<|return|>",
    )
)
