"""Phi-3 (`Phi3ForCausalLM`: Phi-3-mini/medium 4k and 128k, Phi-3.5-mini; Phi-4 shares the class).

Facts (llama.cpp's converter, conversion/phi.py Phi3MiniModel):
- the fused projections stay fused: ``self_attn.qkv_proj`` is ``attn_qkv`` (q, k and v rows
  stacked) and ``mlp.gate_up_proj`` is ``ffn_up`` with twice the rows (gate first, llama.cpp
  splits it itself); NEOX rope, no permute: every tensor is a rename, and a LoRA pair on a fused
  module merges into the fused tensor as it is.
- the converter writes the keys itself, none of the common ones beyond these: context length,
  ``rope.scaling.original_context_length`` (``original_max_position_embeddings``), widths,
  heads, RMS eps, ``rope.dimension_count`` (partial_rotary_factor * hidden / heads),
  ``rope.freq_base`` and the sliding window (0 when the config has none: Phi-4); no
  ``rope.scaling.type``, no key/value length.
- long context (``rope_scaling`` with ``long_factor``: the 128k models): two generated F32
  tensors ``rope_factors_long`` / ``rope_factors_short`` (rotary dims / 2 factors each) and
  ``rope.scaling.attn_factor``: sqrt(1 + ln(s) / ln(original context)) for ``longrope`` / ``su``,
  0.1 ln(s) + 1 for ``yarn``, where s = context / original context (1 when s <= 1).
- tokenizer: a Llama-2-style SentencePiece ``tokenizer.model`` with added tokens ``<|endoftext|>``,
  ``<|assistant|>``, ``<|user|>``, ``<|end|>``, ... read by the converter's own reader (control
  exactly when marked special); a ``GPT2Tokenizer`` tokenizer.json (Phi-4) is BPE.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import gguf
import numpy as np

from ..errors import InputError, UnsupportedError
from ..vocab import VocabOptions
from . import Family, register


def _rope(config: Mapping[str, Any]) -> dict[str, Any]:
    from ..hparams import rope_parameters

    rope = rope_parameters(config)
    if rope.get("original_max_position_embeddings") is None and config.get("original_max_position_embeddings") is not None:
        rope["original_max_position_embeddings"] = config["original_max_position_embeddings"]
    return rope


def _context(config: Mapping[str, Any]) -> Any:
    return config["n_positions"] if "n_positions" in config else config.get("max_position_embeddings")


def rope_dims(config: Mapping[str, Any]) -> int:
    """Rotary dimensions per head: int(partial_rotary_factor * hidden_size) // num_attention_heads."""
    rope = _rope(config)
    pct = rope.get("partial_rotary_factor")
    pct = 1.0 if pct is None else pct
    try:
        return int(pct * config["hidden_size"]) // config["num_attention_heads"]
    except (KeyError, TypeError, ZeroDivisionError) as e:
        raise InputError(f"config.json: hidden_size / num_attention_heads / partial_rotary_factor are not usable "
                         f"({e!r})") from None


def _long_rope(config: Mapping[str, Any]) -> tuple[list, list, float] | None:
    """(long factors, short factors, attention factor) of a long-context config, else None."""
    rope = _rope(config)
    long, short = rope.get("long_factor"), rope.get("short_factor")
    if not long:
        return None
    kind = str(rope.get("rope_type") or "").lower()
    orig = rope.get("original_max_position_embeddings")
    ctx = _context(config)
    if not kind:
        raise InputError(f"config.json: rope_scaling {rope!r} has long_factor but no type")
    if not isinstance(orig, (int, float)) or isinstance(orig, bool) or orig <= 1 or not isinstance(ctx, (int, float)):
        raise InputError("config.json: a long-context rope_scaling needs max_position_embeddings and "
                         f"original_max_position_embeddings > 1 (got {ctx!r} and {orig!r})")
    scale = ctx / orig
    if kind in ("su", "longrope"):
        attn = math.sqrt(1 + math.log(scale) / math.log(orig)) if scale > 1.0 else 1.0
    elif kind == "yarn":
        attn = 0.1 * math.log(scale) + 1.0 if scale > 1.0 else 1.0
    else:
        raise UnsupportedError(f"config.json: rope_scaling type {kind!r} with long_factor: llama.cpp's phi3 knows "
                               "longrope (su) and yarn")
    n = rope_dims(config)
    if not isinstance(short, list) or len(long) != len(short) or len(long) * 2 != n:
        raise InputError(f"config.json: rope_scaling long_factor and short_factor must have {n / 2:g} values each "
                         f"(rotary dims / 2); they have {len(long)} and {len(short) if isinstance(short, list) else 0}")
    return long, short, attn


def phi3_hparams(config: Mapping[str, Any], put) -> None:
    """Phi-3's keys, as its converter writes them (none of the common ones)."""
    from ..hparams import find

    rope = _rope(config)
    put("add_context_length", _context(config), "max_position_embeddings")
    put("add_rope_scaling_orig_ctx_len", rope.get("original_max_position_embeddings"),
        "original_max_position_embeddings")
    put("add_embedding_length", find(config, ("hidden_size", "n_embd"), "config.json"), "hidden_size")
    put("add_feed_forward_length", config.get("intermediate_size"), "intermediate_size")
    put("add_block_count", config.get("num_hidden_layers"), "num_hidden_layers")
    put("add_head_count", find(config, ("num_attention_heads", "n_head"), "config.json"), "num_attention_heads")
    put("add_head_count_kv", find(config, ("num_key_value_heads", "n_head_kv"), "config.json"), "num_key_value_heads")
    put("add_layer_norm_rms_eps", config.get("rms_norm_eps"), "rms_norm_eps")
    put("add_rope_dimension_count", rope_dims(config), "partial_rotary_factor")
    put("add_rope_freq_base", rope.get("rope_theta"), "rope_theta")
    window = config.get("sliding_window")
    put("add_sliding_window", 0 if window is None else window, "sliding_window")
    lr = _long_rope(config)
    if lr is not None:
        put("add_rope_scaling_attn_factors", lr[2], "rope_scaling")


def phi3_rope_factors(config: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """``rope_factors_long`` / ``rope_factors_short`` (F32) of a long-context config; {} otherwise."""
    lr = _long_rope(config)
    if lr is None:
        return {}
    try:
        long, short = (np.asarray(v, dtype=np.float32) for v in lr[:2])
    except (TypeError, ValueError) as e:
        raise InputError(f"config.json: rope_scaling long_factor / short_factor are not numbers ({e})") from None
    return {"rope_factors_long.weight": long, "rope_factors_short.weight": short}


def _kv_heads(config):
    return config["num_attention_heads"]


#: the converter reads tokenizer.model with its own reader; a GPT2Tokenizer tokenizer.json (Phi-4) is BPE
PHI3_VOCAB = VocabOptions(kinds=("sentencepiece", "llama_hf", "bpe"), added_types_from_special=True)

PHI3 = register(
    Family(
        name="phi3",
        hf_architectures=("Phi3ForCausalLM",),
        model_types=("phi3",),
        gguf_arch=gguf.MODEL_ARCH.PHI3,
        # Phi3Config's defaults (transformers 5.x)
        config_defaults={"max_position_embeddings": 4096, "original_max_position_embeddings": 4096,
                         "rms_norm_eps": 1e-05, "rope_theta": 10000.0, "vocab_size": 32064, "hidden_size": 3072,
                         "intermediate_size": 8192, "num_attention_heads": 32, "num_hidden_layers": 32,
                         "sliding_window": None},
        derived=(("num_key_value_heads", _kv_heads),),
        hparams=phi3_hparams,
        common_hparams=False,
        generated=phi3_rope_factors,
        vocab_options=PHI3_VOCAB,
        checked="Llama-2-style SentencePiece tokenizer with Phi-3's added tokens; fused qkv_proj / gate_up_proj "
                "(LoRA on them); long-rope factors and attn_factor; parity with llama.cpp's converter; logits vs "
                "transformers + PEFT",
    )
)
