"""Mixtral (`MixtralForCausalLM`) through llama.cpp's ``llama`` architecture.

Facts (llama.cpp's converter, conversion/llama.py LlamaModel):
- ``block_sparse_moe.experts.{e}.w1/w2/w3`` (gate, down, up) are stacked into ``ffn_gate_exps`` /
  ``ffn_down_exps`` / ``ffn_up_exps``; ``block_sparse_moe.gate`` is the router ``ffn_gate_inp`` (F32);
- q_proj / k_proj are permuted into llama.cpp's rotary row order, as for Llama (arch/llama.py);
- the keys are Llama's plus the expert counts; the tokenizer is Mistral's SentencePiece.
- transformers 5.x holds the experts fused as ``mlp.experts.gate_up_proj`` (E, 2I, H) = w1 over
  w3, and ``mlp.experts.down_proj`` = w2; PEFT ``target_parameters`` adapters target those.
"""

from __future__ import annotations

import gguf

from . import Family, Fused, Stack, register
from .llama import RULES, llama_hparams, llama_vocab

MIXTRAL = register(
    Family(
        name="mixtral",
        hf_architectures=("MixtralForCausalLM",),
        model_types=("mixtral",),
        gguf_arch=gguf.MODEL_ARCH.LLAMA,
        rules=RULES,
        stacks=(
            Stack("block_sparse_moe.experts.{e}.w1.weight", "block_sparse_moe.experts.w1.weight"),
            Stack("block_sparse_moe.experts.{e}.w2.weight", "block_sparse_moe.experts.w2.weight"),
            Stack("block_sparse_moe.experts.{e}.w3.weight", "block_sparse_moe.experts.w3.weight"),
        ),
        fused=(
            Fused("mlp.experts.gate_up_proj", ("block_sparse_moe.experts.{e}.w1.weight",
                                               "block_sparse_moe.experts.{e}.w3.weight")),
            Fused("mlp.experts.down_proj", ("block_sparse_moe.experts.{e}.w2.weight",)),
        ),
        # MixtralConfig's defaults (transformers 5.x); its head_dim stays None unless given
        config_defaults={"max_position_embeddings": 131072, "rms_norm_eps": 1e-05, "rope_theta": 1000000.0,
                         "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 14336,
                         "num_attention_heads": 32, "num_key_value_heads": 8, "num_hidden_layers": 32,
                         "num_local_experts": 8, "num_experts_per_tok": 2},
        hparams=llama_hparams,
        f32_tensors=frozenset({gguf.MODEL_TENSOR.FFN_GATE_INP}),
        expert_params=("gate_up_proj", "down_proj"),
        expert_layout="out_in",
        vocab_options=llama_vocab,
        checked="per-expert experts stacked; per-expert LoRA; GQA q/k permute; parity with llama.cpp's converter; "
                "logits vs transformers + PEFT",
    )
)
