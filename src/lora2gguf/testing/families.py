"""Tiny random models of every dense family, made offline with transformers, for tests and benchmarks.

:func:`make_model` builds a ``LlamaForCausalLM`` / ``MistralForCausalLM`` / ``Qwen2ForCausalLM``
/ ``Qwen3ForCausalLM`` (or another registered HF class) from a small config, sets every weight to
seeded values from numpy (a "peaked" init, as :mod:`lora2gguf.synth` documents: logits spread
over the vocabulary, so comparing next-token distributions means something), and saves it with
``save_pretrained`` in bfloat16, as a hub checkpoint is laid out, with tokenizer files written
by ``tokenizer(dest)``. Adapters come from :func:`lora2gguf.synth.make_adapter` (PEFT itself).

Needs torch and transformers (the ``reference`` extra); nothing here is used by the converter.
"""

from __future__ import annotations

import math
import zlib
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from ..errors import InputError

#: the HF class and config class of each family, and its small default shape
FAMILIES: dict[str, dict[str, Any]] = {
    "llama": {"cls": "LlamaForCausalLM", "config": "LlamaConfig", "model_type": "llama"},
    "mistral": {"cls": "MistralForCausalLM", "config": "MistralConfig", "model_type": "mistral"},
    "qwen2": {"cls": "Qwen2ForCausalLM", "config": "Qwen2Config", "model_type": "qwen2"},
    "qwen3": {"cls": "Qwen3ForCausalLM", "config": "Qwen3Config", "model_type": "qwen3"},
}

#: every Linear layer of a dense decoder block: what "all linear modules" targets
ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LOGIT_STD = 6.0


def small_config(family: str, *, vocab_size: int, hidden_size: int = 64, num_hidden_layers: int = 3,
                 num_attention_heads: int = 4, num_key_value_heads: int = 2, intermediate_size: int = 96,
                 **extra: Any) -> dict[str, Any]:
    """Keyword arguments for the family's config class: GQA (kv heads != heads) so the q/k permute
    is exercised, several layers, and whatever ``extra`` adds (rope_scaling, tie_word_embeddings...)."""
    if family not in FAMILIES:
        raise InputError(f"family {family!r}: one of {sorted(FAMILIES)}")
    cfg = dict(vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_hidden_layers,
               num_attention_heads=num_attention_heads, num_key_value_heads=num_key_value_heads,
               intermediate_size=intermediate_size, max_position_embeddings=4096)
    if family == "qwen3":
        cfg["head_dim"] = hidden_size // num_attention_heads  # Qwen3's default is 128
    cfg.update(extra)
    return cfg


def _init(name: str, shape: tuple[int, ...], cfg: Mapping[str, Any]) -> tuple[float, float]:
    """(mean, std) of the peaked init for one parameter."""
    h = cfg["hidden_size"]
    heads = cfg["num_attention_heads"]
    hd = cfg.get("head_dim") or h // heads
    if name.endswith("norm.weight"):
        return 1.0, 0.1
    if name.endswith(".bias"):
        return 0.0, 0.1
    if name.endswith("embed_tokens.weight"):
        return 0.0, 1.0
    if name == "lm_head.weight":
        return 0.0, LOGIT_STD / math.sqrt(h)
    if name.endswith("o_proj.weight"):
        return 0.0, 1.0 / math.sqrt(heads * hd)
    if name.endswith("down_proj.weight"):
        return 0.0, 1.0 / math.sqrt(cfg["intermediate_size"])
    return 0.0, 1.0 / math.sqrt(h)


def make_model(dest: str | Path, family: str, config: Mapping[str, Any], *, seed: int = 0,
               tokenizer: Callable[[Path], Any] | None = None) -> Path:
    """A tiny random ``family`` model saved in ``dest`` (bfloat16 safetensors, config.json,
    generation_config.json) with the tokenizer files ``tokenizer(dest)`` writes."""
    import torch
    import transformers

    spec = FAMILIES[family]
    cfg = getattr(transformers, spec["config"])(**config)
    torch.manual_seed(seed)
    model = getattr(transformers, spec["cls"])(cfg)
    tied = bool(getattr(cfg, "tie_word_embeddings", False))
    with torch.no_grad():
        for name, p in model.named_parameters():
            mean, std = _init(name, tuple(p.shape), config)
            rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
            values = rng.standard_normal(tuple(p.shape)).astype(np.float32) * np.float32(std) + np.float32(mean)
            p.copy_(torch.from_numpy(values))
        if tied:
            model.tie_weights()
    model = model.to(torch.bfloat16)
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(dest))
    if tokenizer is not None:
        tokenizer(dest)
    return dest
