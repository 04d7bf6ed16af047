"""Model hyperparameters: read from the (normalized) config, checked, and written as GGUF metadata.

:func:`write_hparams` writes what llama.cpp's converter writes for every text model (block
count, context, widths, heads, RoPE, norms, experts, head_dim), then the family's own keys
(its ``hparams`` override point). Each value is checked against the type gguf-py's writer
takes, so a bad config value is an InputError naming config.json and the field.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import gguf

from .arch import Family
from .errors import InputError

# (writer method, config keys in the order the converter looks for them, required)
TEXT_HPARAMS: tuple[tuple[str, tuple[str, ...], bool], ...] = (
    ("add_block_count", ("n_layers", "num_hidden_layers", "n_layer", "num_layers"), True),
    ("add_context_length", ("max_position_embeddings", "n_ctx", "n_positions", "max_length",
                            "max_sequence_length", "model_max_length"), False),
    ("add_embedding_length", ("hidden_size", "n_embd", "dim"), False),
    ("add_feed_forward_length", ("prefix_dense_intermediate_size", "dense_intermediate_size", "intermediate_size",
                                 "n_inner", "hidden_dim"), False),
    ("add_head_count", ("num_attention_heads", "n_head", "n_heads"), False),
    ("add_head_count_kv", ("num_key_value_heads", "n_kv_heads"), False),
    ("add_layer_norm_rms_eps", ("rms_norm_eps", "norm_eps"), False),
    ("add_layer_norm_eps", ("layer_norm_eps", "layer_norm_epsilon", "norm_epsilon"), False),
    ("add_expert_count", ("num_local_experts", "num_experts", "n_routed_experts"), False),
    ("add_expert_used_count", ("num_experts_per_tok", "num_experts_per_token", "top_k_experts"), False),
)


def _number(config: Mapping, key: str, where: str) -> Any:
    value = config[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InputError(f"{where}: field {key!r} is {value!r}, expected a number. Fix the config or download it again.")
    return value


def find(config: Mapping, keys: tuple[str, ...], where: str, required: bool = True) -> Any:
    """The value of the first of ``keys`` present in the config (as the converter's find_hparam:
    a key present with the value None hides the later ones)."""
    key = next((k for k in keys if k in config), None)
    if key is None or config[key] is None:
        if required:
            raise InputError(f"{where}: missing field {keys[0]!r}, which the GGUF needs. Is this the model's config.json?")
        return None
    return _number(config, key, where)


def rope_parameters(config: Mapping, where: str = "config.json") -> dict[str, Any]:
    """RoPE settings of the full-attention layers in one shape, from transformers 5.x
    `rope_parameters` (rope_theta inside) or the older `rope_scaling` + top-level `rope_theta`."""
    params = config.get("rope_parameters")
    if params is None:
        params = dict(config.get("rope_scaling") or {})
        for key in ("rope_theta", "partial_rotary_factor", "original_max_position_embeddings"):
            if key not in params and config.get(key) is not None:
                params[key] = config[key]
    elif not isinstance(params, dict):
        raise InputError(f"{where}: 'rope_parameters' is {params!r}, expected an object")
    else:
        params = dict(params.get("full_attention", params))
    if not isinstance(params, dict):
        raise InputError(f"{where}: the RoPE settings are {params!r}, expected an object")
    if "type" in params and "rope_type" not in params:
        params["rope_type"] = params["type"]
    return params


def sliding_rope_theta(config: Mapping) -> Any:
    params = config.get("rope_parameters")
    if isinstance(params, dict) and isinstance(params.get("sliding_attention"), dict):
        return params["sliding_attention"].get("rope_theta")
    return None


def _value_kind(method: str) -> str:
    """'int' or 'float': what gguf-py's writer method takes (from its signature)."""
    import inspect

    params = list(inspect.signature(getattr(gguf.GGUFWriter, method)).parameters.values())
    ann = params[1].annotation if len(params) > 1 else None
    return ann if isinstance(ann, str) else getattr(ann, "__name__", str(ann))


def _put(writer: gguf.GGUFWriter, method: str, value: Any, where: str, key: str) -> None:
    """Call a GGUFWriter add_* method after checking the value fits its GGUF type (uint32 for
    counts and lengths, float32 for the rest)."""
    kind = _value_kind(method)
    if kind == "int":
        ok = isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**32
        want = "a non-negative integer"
    elif kind == "float":
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        want = "a finite number"
    else:
        ok, want = True, ""
    if not ok:
        raise InputError(f"{where}: field {key!r} is {value!r}, expected {want}. Fix the config or download it again.")
    getattr(writer, method)(value)


def _write_rope(writer, config: Mapping, where: str) -> dict[str, Any]:
    rope = rope_parameters(config, where)
    rope_type = rope.get("rope_type")
    factor = rope.get("factor")
    if rope_type == "linear" and factor is not None:
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        _put(writer, "add_rope_scaling_factor", factor, where, "rope factor")
    elif rope_type == "yarn" and factor is not None:
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        _put(writer, "add_rope_scaling_factor", factor, where, "rope factor")
        if rope.get("original_max_position_embeddings") is None:
            raise InputError(f"{where}: YaRN rope scaling without 'original_max_position_embeddings'")
        _put(writer, "add_rope_scaling_orig_ctx_len", rope["original_max_position_embeddings"], where,
             "original_max_position_embeddings")
        attn = rope.get("attention_factor", rope.get("attn_factor"))
        for value, method, key in (
            (rope.get("extrapolation_factor"), "add_rope_scaling_yarn_ext_factor", "extrapolation_factor"),
            (attn, "add_rope_scaling_yarn_attn_factor", "attention_factor"),
            (rope.get("beta_fast"), "add_rope_scaling_yarn_beta_fast", "beta_fast"),
            (rope.get("beta_slow"), "add_rope_scaling_yarn_beta_slow", "beta_slow"),
        ):
            if value is not None:
                _put(writer, method, value, where, key)
    elif rope_type in ("su", "longrope"):
        writer.add_rope_scaling_type(gguf.RopeScalingType.LONGROPE)
    if rope.get("rope_theta") is not None:
        _put(writer, "add_rope_freq_base", rope["rope_theta"], where, "rope_theta")
    swa = sliding_rope_theta(config)
    if swa is not None:
        _put(writer, "add_rope_freq_base_swa", swa, where, "sliding_attention.rope_theta")
    return rope


def write_hparams(writer: gguf.GGUFWriter, family: Family, config: Mapping, where: str = "config.json") -> dict:
    """Write the hyperparameters of a (normalized) config; returns {writer method: value}.
    A family whose converter writes its keys itself (``common_hparams`` False) gets only its own."""
    written: dict[str, Any] = {}
    if family.common_hparams:
        _write_common(writer, config, where, written)
    if family.hparams is not None:
        def put(method: str, value: Any, key: str) -> None:
            _put(writer, method, value, where, key)
            written[method] = value

        family.hparams(config, put)
    return written


def _write_common(writer: gguf.GGUFWriter, config: Mapping, where: str, written: dict[str, Any]) -> None:
    """The keys llama.cpp's converter writes for every text model."""
    for method, keys, required in TEXT_HPARAMS:
        value = find(config, keys, where, required)
        if value is not None:
            _put(writer, method, value, where, next(k for k in keys if k in config))
            written[method] = value
    if config.get("is_causal") is False:
        writer.add_causal_attention(False)
    written["rope"] = _write_rope(writer, config, where)
    if config.get("head_dim") is not None:
        hd = _number(config, "head_dim", where)
        _put(writer, "add_key_length", hd, where, "head_dim")
        _put(writer, "add_value_length", hd, where, "head_dim")
        written["add_key_length"] = hd


def validate(family: Family, config: Mapping, where: str = "config.json") -> None:
    """Check every field the GGUF metadata and the plan need, before any tensor is planned or read:
    a bad value is an InputError naming config.json and the field."""
    write_hparams(gguf.GGUFWriter(None, family.gguf_arch_name), family, config, where)
    for key in ("vocab_size", "num_hidden_layers"):
        value = find(config, (key,), where)
        if not isinstance(value, int) or value < 1:
            raise InputError(f"{where}: field {key!r} is {value!r}, expected a positive integer. "
                             "Fix the config or download it again.")
    if family.generated is not None:
        family.generated(config)  # raises InputError for a bad rope config
