"""Llama-family models through llama.cpp's ``llama`` architecture: `LlamaForCausalLM` (Llama 2,
Llama 3.0-3.3, SmolLM/SmolLM2) and `MistralForCausalLM` (Mistral v0.1-v0.3, Nemo-style).

Facts (llama.cpp's converter, conversion/llama.py):
- q_proj and k_proj (weights and biases) are permuted into llama.cpp's rotary layout: per head,
  rows (2, head_dim/2) -> (head_dim/2, 2); q by num_attention_heads, k by num_key_value_heads.
  The LoRA delta is permuted the same way (its B rows; layout.PermuteHeads).
- a ``llama3`` rope scaling makes a generated F32 tensor ``rope_freqs.weight`` (head_dim/2
  factors), written first; other rope scalings are ``rope.scaling.*`` keys (hparams.py).
- extra GGUF keys: ``vocab_size`` and ``rope.dimension_count`` (head_dim, else hidden / heads).
- tied embeddings: ``output.weight`` exists only when the checkpoint holds ``lm_head.weight``.
- the tokenizer: SentencePiece ``tokenizer.model`` when the folder has one (Llama 2, Mistral
  v0.1-v0.3), else the BPE ``tokenizer.json``, its pre-tokenizer named by llama.cpp's hash
  (Llama 3 ``llama-bpe``, SmolLM ``smollm``, Mistral Nemo ``tekken``). The tests check
  ``llama-bpe``; no SmolLM or Nemo vocabulary is available offline to check the other two.
- a 49,152-row vocabulary (SmolLM's) is written with ``add_bos_token`` False, whatever the
  tokenizer says.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import gguf
import numpy as np

from ..errors import InputError
from ..layout import PermuteHeads
from ..vocab import VocabOptions
from . import Family, Rule, register

_Q = PermuteHeads("num_attention_heads")
_K = PermuteHeads("num_attention_heads", "num_key_value_heads")
RULES = (
    Rule("self_attn.q_proj.weight", _Q),
    Rule("self_attn.q_proj.bias", _Q),
    Rule("self_attn.k_proj.weight", _K),
    Rule("self_attn.k_proj.bias", _K),
)


def head_dim(config: Mapping[str, Any]) -> int:
    return config["hidden_size"] // config["num_attention_heads"]


def llama_hparams(config, put) -> None:
    put("add_vocab_size", config["vocab_size"], "vocab_size")
    rope_dim = config.get("head_dim")
    if rope_dim is None:
        rope_dim = head_dim(config)
    put("add_rope_dimension_count", rope_dim, "head_dim")


def llama3_rope_factors(config: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """``rope_freqs.weight`` for a ``llama3`` rope scaling: per rotary frequency, 1 for short
    wavelengths, ``factor`` for long ones, a smooth blend between (Meta's formula, computed in
    float32 as the converter does); {} for other scalings."""
    from ..hparams import rope_parameters

    rope = rope_parameters(config)
    if str(rope.get("rope_type") or "").lower() != "llama3":
        return {}
    f32 = np.float32
    try:
        base = float(rope.get("rope_theta", 10000.0))
        dim = int(config.get("head_dim") or head_dim(config))
        factor = float(rope.get("factor", 8.0))
        low = float(rope.get("low_freq_factor", 1.0))
        high = float(rope.get("high_freq_factor", 4.0))
        old = float(rope.get("original_max_position_embeddings", 8192))
    except (TypeError, ValueError, KeyError, ZeroDivisionError) as e:
        raise InputError(f"config.json: the llama3 rope scaling {rope!r} is not usable ({e})") from None
    if dim <= 0 or base <= 0 or high == low:
        raise InputError(f"config.json: the llama3 rope scaling {rope!r} (head_dim {dim}) is not usable")
    exps = (np.arange(0, dim, 2, dtype=f32) / f32(dim)).astype(f32)
    freqs = (f32(1.0) / np.power(np.float64(base), exps.astype(np.float64)).astype(f32)).astype(f32)
    low_wavelen, high_wavelen = old / low, old / high
    out = []
    for freq in freqs:
        wavelen = f32(f32(2 * math.pi) / freq)
        if wavelen < high_wavelen:
            out.append(f32(1.0))
        elif wavelen > low_wavelen:
            out.append(f32(factor))
        else:
            smooth = f32((f32(old) / wavelen - f32(low)) / f32(high - low))
            out.append(f32(f32(1.0) / f32(f32(f32(1.0) - smooth) / f32(factor) + smooth)))
    return {"rope_freqs.weight": np.array(out, dtype=f32)}


def _kv_heads(config):
    return config["num_attention_heads"]


#: CodeLlama's infill and end-of-turn tokens (its 32,016-token vocabulary), as the converter fixes them
CODELLAMA_SPECIALS = {"prefix": 32007, "suffix": 32008, "middle": 32009, "eot": 32010}


def llama_vocab(config: Mapping[str, Any]) -> VocabOptions:
    """SentencePiece tokenizer.model first (Llama 2, Mistral v0.1-v0.3), else tokenizer.json;
    add_prefix_space from tokenizer_config.json; a 49,152-token vocabulary (SmolLM) adds no BOS;
    a 32,016-token one (CodeLlama) has fixed infill tokens."""
    n = config.get("vocab_size")
    return VocabOptions(kinds=("sentencepiece", "llama_hf", "bpe"), space_prefix_from_config=True,
                        add_bos=False if n == 49152 else None,
                        fixed_special_ids=CODELLAMA_SPECIALS if n == 32016 else {})


LLAMA = register(
    Family(
        name="llama",
        hf_architectures=("LlamaForCausalLM",),
        model_types=("llama",),
        gguf_arch=gguf.MODEL_ARCH.LLAMA,
        rules=RULES,
        # LlamaConfig's defaults (transformers 5.x): what the converter sees for absent keys
        config_defaults={"max_position_embeddings": 2048, "rms_norm_eps": 1e-06, "rope_theta": 10000.0,
                         "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008,
                         "num_attention_heads": 32, "num_hidden_layers": 32},
        derived=(("num_key_value_heads", _kv_heads), ("head_dim", head_dim)),
        hparams=llama_hparams,
        generated=llama3_rope_factors,
        vocab_options=llama_vocab,
        checked="Llama 3 (llama-bpe BPE) and Llama 2 (SentencePiece) tokenizers; GQA q/k permute; llama3 "
                "rope_freqs; linear and YaRN rope.scaling keys; no BOS for a 49,152-row vocabulary (SmolLM's "
                "size); tied and untied embeddings; BF16 and F16 parity with llama.cpp's converter; logits vs "
                "transformers + PEFT",
    )
)

MISTRAL = register(
    Family(
        name="mistral",
        hf_architectures=("MistralForCausalLM",),
        model_types=("mistral",),
        gguf_arch=gguf.MODEL_ARCH.LLAMA,
        rules=RULES,
        # MistralConfig's defaults (transformers 5.x)
        config_defaults={"max_position_embeddings": 131072, "rms_norm_eps": 1e-06, "rope_theta": 10000.0,
                         "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 14336,
                         "num_attention_heads": 32, "num_key_value_heads": 8, "num_hidden_layers": 32},
        derived=(("head_dim", head_dim),),
        hparams=llama_hparams,
        generated=llama3_rope_factors,
        vocab_options=llama_vocab,
        checked="SentencePiece (v0.1-v0.3) tokenizer; GQA q/k permute; parity with llama.cpp's converter; logits "
                "vs transformers + PEFT",
    )
)
