"""Qwen2 / Qwen2.5 (`Qwen2ForCausalLM`) and Qwen3 (`Qwen3ForCausalLM`).

Facts (llama.cpp's converter, conversion/qwen.py):
- NEOX rope: no q/k permute; every tensor is a rename.
- Qwen2's q/k/v projections have biases (1-D, so F32 in the GGUF).
- Qwen3 has per-head RMSNorms ``self_attn.q_norm`` / ``k_norm`` (``attn_q_norm`` / ``attn_k_norm``)
  and no biases; its config's head_dim defaults to 128 (not hidden / heads).
- the GGUF keys are those of every text model (hparams.py).
- tokenizer: BPE ``tokenizer.json`` with the ``qwen2`` pre-tokenizer; chat format ChatML
  (``<|im_start|>`` / ``<|im_end|>``), Qwen3 with ``<think>`` blocks.
"""

from __future__ import annotations

import gguf

from ..vocab import VocabOptions
from . import Family, register

#: the converter tries a SentencePiece tokenizer.model first, then tokenizer.json
QWEN_VOCAB = VocabOptions(kinds=("sentencepiece", "bpe"))


def _kv_heads(config):
    return config["num_attention_heads"]


QWEN2 = register(
    Family(
        name="qwen2",
        hf_architectures=("Qwen2ForCausalLM",),
        model_types=("qwen2",),
        gguf_arch=gguf.MODEL_ARCH.QWEN2,
        # Qwen2Config's defaults (transformers 5.x)
        config_defaults={"max_position_embeddings": 32768, "rms_norm_eps": 1e-06, "rope_theta": 10000.0,
                         "vocab_size": 151936, "hidden_size": 4096, "intermediate_size": 22016,
                         "num_attention_heads": 32, "num_hidden_layers": 32},
        derived=(("num_key_value_heads", _kv_heads),),
        vocab_options=QWEN_VOCAB,
        checked="qwen2 BPE tokenizer; q/k/v biases; parity with llama.cpp's converter; logits vs transformers + PEFT",
    )
)

QWEN3 = register(
    Family(
        name="qwen3",
        hf_architectures=("Qwen3ForCausalLM",),
        model_types=("qwen3",),
        gguf_arch=gguf.MODEL_ARCH.QWEN3,
        # Qwen3Config's defaults (transformers 5.x)
        config_defaults={"max_position_embeddings": 32768, "rms_norm_eps": 1e-06, "rope_theta": 10000.0,
                         "vocab_size": 151936, "hidden_size": 4096, "intermediate_size": 22016,
                         "num_attention_heads": 32, "num_hidden_layers": 32, "head_dim": 128},
        derived=(("num_key_value_heads", _kv_heads),),
        vocab_options=QWEN_VOCAB,
        checked="qwen2 BPE tokenizer (Qwen3 vocabulary); q_norm/k_norm; parity with llama.cpp's converter; "
                "logits vs transformers + PEFT",
    )
)
