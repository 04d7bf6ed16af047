"""Qwen2-MoE (`Qwen2MoeForCausalLM`, with a shared expert) and Qwen3-MoE (`Qwen3MoeForCausalLM`).

Facts (llama.cpp's converter, conversion/qwen.py Qwen2MoeModel):
- experts saved per expert (``mlp.experts.{e}.gate_proj/up_proj/down_proj.weight``, as
  transformers saves them) are stacked into ``ffn_gate_exps`` / ``ffn_up_exps`` /
  ``ffn_down_exps`` (E, rows, cols), expert e the matrix e; a checkpoint holding transformers
  5.x's fused parameters (``mlp.experts.gate_up_proj`` (E, 2I, H), gate the first I rows, up the
  next I: halves, not interleaved; ``mlp.experts.down_proj`` (E, H, I)) gives the same tensors.
- the router ``mlp.gate`` is ``ffn_gate_inp`` (F32); Qwen2-MoE's shared expert is
  ``ffn_{gate,up,down}_shexp`` and its gate ``ffn_gate_inp_shexp`` (F32).
- extra keys: ``expert_feed_forward_length`` (moe_intermediate_size) and, with a shared expert,
  ``expert_shared_feed_forward_length``.
- LoRA on the experts comes as one Linear pair per expert (PEFT with transformers 4.x) or as PEFT
  ``target_parameters`` on the fused parameters (transformers 5.x; each expert a Linear weight:
  layout "out_in"). Both merge into a per-expert checkpoint (``fused``: the fused parameters'
  shapes, per layer); a fused checkpoint takes target_parameters adapters only (a per-expert
  adapter on it matches no tensor and is refused).
- attention as Qwen2 (q/k/v biases) / Qwen3 (q_norm/k_norm); tokenizer ``qwen2`` BPE; ChatML.
"""

from __future__ import annotations

import gguf

from ..layout import Copy, Split
from . import Family, Fused, Rule, Stack, register
from .qwen import QWEN_VOCAB

STACKS = (
    Stack("mlp.experts.{e}.gate_proj.weight", "mlp.experts.gate_proj.weight"),
    Stack("mlp.experts.{e}.up_proj.weight", "mlp.experts.up_proj.weight"),
    Stack("mlp.experts.{e}.down_proj.weight", "mlp.experts.down_proj.weight"),
)
FUSED = (
    Fused("mlp.experts.gate_up_proj", ("mlp.experts.{e}.gate_proj.weight", "mlp.experts.{e}.up_proj.weight")),
    Fused("mlp.experts.down_proj", ("mlp.experts.{e}.down_proj.weight",)),
)
# a checkpoint saved with the fused parameters themselves
RULES = (
    Rule("mlp.experts.gate_up_proj", Split(parts=2, interleaved=False),
         ("mlp.experts.gate_proj.weight", "mlp.experts.up_proj.weight")),
    Rule("mlp.experts.down_proj", Copy(), ("mlp.experts.down_proj.weight",)),
)


def _hparams(config, put) -> None:
    if config.get("moe_intermediate_size") is not None:
        put("add_expert_feed_forward_length", config["moe_intermediate_size"], "moe_intermediate_size")
    if config.get("shared_expert_intermediate_size") is not None:
        put("add_expert_shared_feed_forward_length", config["shared_expert_intermediate_size"],
            "shared_expert_intermediate_size")


def _kv_heads(config):
    return config["num_attention_heads"]


MOE_F32 = frozenset({gguf.MODEL_TENSOR.FFN_GATE_INP, gguf.MODEL_TENSOR.FFN_GATE_INP_SHEXP})

QWEN2_MOE = register(
    Family(
        name="qwen2_moe",
        hf_architectures=("Qwen2MoeForCausalLM",),
        model_types=("qwen2_moe",),
        gguf_arch=gguf.MODEL_ARCH.QWEN2MOE,
        rules=RULES,
        stacks=STACKS,
        fused=FUSED,
        # Qwen2MoeConfig's defaults (transformers 5.x)
        config_defaults={"max_position_embeddings": 32768, "rms_norm_eps": 1e-06, "rope_theta": 10000.0,
                         "vocab_size": 151936, "hidden_size": 2048, "intermediate_size": 5632,
                         "num_attention_heads": 16, "num_hidden_layers": 24, "num_experts": 60,
                         "num_experts_per_tok": 4, "moe_intermediate_size": 1408,
                         "shared_expert_intermediate_size": 5632},
        derived=(("num_key_value_heads", _kv_heads),),
        hparams=_hparams,
        f32_tensors=MOE_F32,
        expert_params=("gate_up_proj", "down_proj"),
        expert_layout="out_in",
        vocab_options=QWEN_VOCAB,
        checked="per-expert and fused experts with a shared expert; per-expert LoRA; parity with llama.cpp's "
                "converter; logits vs transformers + PEFT",
    )
)

QWEN3_MOE = register(
    Family(
        name="qwen3_moe",
        hf_architectures=("Qwen3MoeForCausalLM",),
        model_types=("qwen3_moe",),
        gguf_arch=gguf.MODEL_ARCH.QWEN3MOE,
        rules=RULES,
        stacks=STACKS,
        fused=FUSED,
        # Qwen3MoeConfig's defaults (transformers 5.x)
        config_defaults={"max_position_embeddings": 32768, "rms_norm_eps": 1e-06, "rope_theta": 10000.0,
                         "vocab_size": 151936, "hidden_size": 2048, "intermediate_size": 6144,
                         "num_attention_heads": 32, "num_key_value_heads": 4, "num_hidden_layers": 24,
                         "num_local_experts": 128, "num_experts_per_tok": 8, "moe_intermediate_size": 768},
        hparams=_hparams,
        f32_tensors=MOE_F32,
        expert_params=("gate_up_proj", "down_proj"),
        expert_layout="out_in",
        vocab_options=QWEN_VOCAB,
        checked="per-expert and fused experts; per-expert LoRA and target_parameters LoRA; parity with llama.cpp's "
                "converter; logits vs transformers + PEFT",
    )
)
