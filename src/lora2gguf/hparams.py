"""Model hyperparameters: read from config.json, checked, and written as GGUF metadata."""

from __future__ import annotations

import math
from typing import Any, Mapping

import gguf

from .arch import Architecture
from .errors import InputError


def _number(config: Mapping, key: str, where: str, kind=(int, float)) -> Any:
    value = config[key]
    if isinstance(value, bool) or not isinstance(value, kind):
        want = "an integer" if kind is int or kind == (int,) else "a number"
        raise InputError(f"{where}: field {key!r} is {value!r}, expected {want}. Fix the config or download it again.")
    return value


def find(config: Mapping, keys: tuple[str, ...], where: str, required: bool = True) -> Any:
    for k in keys:
        if k in config and config[k] is not None:
            return _number(config, k, where)
    if required:
        raise InputError(f"{where}: missing field {keys[0]!r}, which the GGUF needs. Is this the model's config.json?")
    return None


def rope_parameters(config: Mapping, where: str = "config.json") -> dict[str, Any]:
    """RoPE settings in one shape, from transformers 5.x `rope_parameters` (rope_theta inside) or
    the older `rope_scaling` + top-level `rope_theta`."""
    params = config.get("rope_parameters")
    if params is None:
        params = dict(config.get("rope_scaling") or {})
        if "rope_theta" in config:
            params["rope_theta"] = config["rope_theta"]
    elif not isinstance(params, dict):
        raise InputError(f"{where}: 'rope_parameters' is {params!r}, expected an object")
    else:
        params = dict(params.get("full_attention", params))
    if "type" in params and "rope_type" not in params:
        params["rope_type"] = params["type"]
    return params


def _value_kind(method: str) -> str:
    """'int' or 'float': what gguf-py's writer method takes (from its signature)."""
    import inspect

    params = list(inspect.signature(getattr(gguf.GGUFWriter, method)).parameters.values())
    ann = params[1].annotation if len(params) > 1 else None
    return ann if isinstance(ann, str) else getattr(ann, "__name__", str(ann))


def _put(writer: gguf.GGUFWriter, method: str, value: Any, where: str, key: str) -> None:
    """Call a GGUFWriter add_* method after checking the value fits its GGUF type (uint32 for
    counts and lengths, float32 for the rest): a bad config value is an InputError naming the
    field, not a struct.error from deep inside the writer."""
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


def write_hparams(writer: gguf.GGUFWriter, arch: Architecture, config: Mapping, where: str = "config.json") -> dict:
    """Write the architecture's hyperparameters; returns them as {gguf key method: value}."""
    written: dict[str, Any] = {}
    for method, keys, required in arch.hparams:
        value = find(config, keys, where, required)
        if value is not None:
            _put(writer, method, value, where, next(k for k in keys if config.get(k) is not None))
            written[method] = value
    rope = rope_parameters(config, where)
    rope_type = rope.get("rope_type")
    factor = rope.get("factor")
    if rope_type == "yarn" and factor is not None:
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        _put(writer, "add_rope_scaling_factor", factor, where, "rope factor")
        if "original_max_position_embeddings" not in rope:
            raise InputError(f"{where}: YaRN rope scaling without 'original_max_position_embeddings'")
        _put(writer, "add_rope_scaling_orig_ctx_len", rope["original_max_position_embeddings"], where,
             "original_max_position_embeddings")
        for key, method in (
            ("extrapolation_factor", "add_rope_scaling_yarn_ext_factor"),
            ("attention_factor", "add_rope_scaling_yarn_attn_factor"),
            ("beta_fast", "add_rope_scaling_yarn_beta_fast"),
            ("beta_slow", "add_rope_scaling_yarn_beta_slow"),
        ):
            if rope.get(key) is not None:
                _put(writer, method, rope[key], where, key)
    elif rope_type == "linear" and factor is not None:
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        _put(writer, "add_rope_scaling_factor", factor, where, "rope factor")
    if rope.get("rope_theta") is not None:
        _put(writer, "add_rope_freq_base", rope["rope_theta"], where, "rope_theta")
    written["rope"] = rope
    return written


def validate(arch: Architecture, config: Mapping, where: str = "config.json") -> None:
    """Check every field the GGUF metadata and the plan need, before any tensor is planned or read:
    a bad value is an InputError naming config.json and the field."""
    write_hparams(gguf.GGUFWriter(None, arch.gguf_arch_name), arch, config, where)
    for key in ("vocab_size", "num_hidden_layers"):
        value = find(config, (key,), where)
        if not isinstance(value, int) or value < 1:
            raise InputError(f"{where}: field {key!r} is {value!r}, expected a positive integer. "
                             "Fix the config or download it again.")
