"""A PEFT LoRA adapter: its config read strictly, and every adapter tensor matched to the base
tensor it changes. Nothing is silently ignored: an adapter feature lora2gguf does not merge
yet stops here with an error that names it.

What an adapter can hold (PEFT's saved keys, prefix ``base_model.model.``):
- LoRA pairs ``X.lora_A.weight`` / ``X.lora_B.weight`` on Linear layers (and, nested in
  ``base_layer``, on 3-D expert parameters named in ``target_parameters``);
- LoRA on an Embedding: ``X.lora_embedding_A`` (r, num_embeddings) and ``X.lora_embedding_B``
  (dim, r), delta ``(B @ A)^T * scale``;
- full weights that replace the base's: ``modules_to_save`` (``X.weight``), and the embedding /
  lm_head ``X.base_layer.weight`` PEFT saves with ``save_embedding_layers`` (a vocabulary resized
  by the fine-tune: more rows than the base);
- trainable token rows: ``X.token_adapter.trainable_tokens_delta`` (n, dim), the new values of
  the rows ``trainable_token_indices`` names (PEFT merges them with ``index_copy``).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import numpy as np
from pathlib import Path
from typing import Any, Collection, Mapping

from . import lora
from .arch import Architecture
from .errors import FormatError, InputError, UnsupportedError
from .jsonfile import read_json_object
from .safetensors_io import Checkpoint, TensorInfo

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
KEY_PREFIX = "base_model.model."

# adapter_config fields that change what the merge must do; a truthy value we do not handle stops the run
UNSUPPORTED_FEATURES: dict[str, str] = {
    "lora_bias": "LoRA bias terms (lora_bias)",
    "layer_replication": "layer replication",
    "use_qalora": "QA-LoRA",
    "use_bdlora": "block-diagonal LoRA",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens)",
    "velora_config": "VeLoRA",
    "kasa_config": "KaSA",
}


@dataclass(frozen=True)
class LoraTerm:
    """One LoRA pair and the base tensor it changes: target += scale * (B @ A in target's layout)."""

    target: str  # HF name of the base tensor, e.g. model.layers.0.self_attn.q_proj.weight
    key: str  # adapter key prefix, for messages
    a: TensorInfo
    b: TensorInfo
    rank: int
    alpha: float
    scale: float
    kind: str  # "linear", "embedding" or "experts"
    num_experts: int = 1
    fan_in_fan_out: bool = False
    layout: str = "in_out"  # experts: how the 3-D parameter holds each matrix (lora.expert_matrix_factors)
    magnitude: TensorInfo | None = None  # DoRA: the magnitude vector (one value per output row)


@dataclass(frozen=True)
class TokenRows:
    """Rows of a base tensor replaced by trained values (PEFT's trainable tokens)."""

    target: str
    indices: tuple[int, ...]
    values: TensorInfo


@dataclass
class Adapter:
    folder: Path
    config: dict[str, Any]
    checkpoint: Checkpoint
    terms: dict[str, list[LoraTerm]] = field(default_factory=dict)
    # base tensor name -> the adapter's full tensor that replaces it (modules_to_save, resized embeddings)
    replaced: dict[str, TensorInfo] = field(default_factory=dict)
    token_rows: dict[str, TokenRows] = field(default_factory=dict)
    # adapter key -> a lora_B bias (lora_bias): read only where the caller handles it (load_adapter's allow)
    lora_biases: dict[str, TensorInfo] = field(default_factory=dict)

    @property
    def all_terms(self) -> list[LoraTerm]:
        return [t for ts in self.terms.values() for t in ts]

    @property
    def use_rslora(self) -> bool:
        return bool(self.config.get("use_rslora"))


def read_config(folder: Path) -> dict[str, Any]:
    return read_json_object(Path(folder) / CONFIG_NAME,
                            missing="is this a PEFT adapter folder (saved with save_pretrained)?")


def check_config(config: Mapping[str, Any], path: Path, allow: Collection[str] = ()) -> None:
    """Raise for adapter types and features that the merge does not handle (``allow``: keys of
    :data:`UNSUPPORTED_FEATURES` the caller handles itself)."""
    peft_type = config.get("peft_type")
    if peft_type != "LORA":
        raise UnsupportedError(f"{path}: peft_type is {peft_type!r}; lora2gguf merges LoRA adapters only (peft_type LORA).")
    for key, label in UNSUPPORTED_FEATURES.items():
        if config.get(key) and key not in allow:
            raise UnsupportedError(
                f"{path}: the adapter uses {label} ({key}={config[key]!r}), which lora2gguf does not merge yet. "
                "Merge it with PEFT (merge_and_unload) and convert the merged model, or retrain without it."
            )
    for key, kind in (("r", int), ("lora_alpha", (int, float))):
        value = config.get(key)
        if isinstance(value, bool) or not isinstance(value, kind) or not math.isfinite(value) or value <= 0:
            raise InputError(f"{path}: field {key!r} is {value!r}, expected a positive number")
    for key, kind in (("rank_pattern", int), ("alpha_pattern", (int, float))):
        value = config.get(key) or {}
        if not isinstance(value, dict):
            raise InputError(f"{path}: field {key!r} is {value!r}, expected an object")
        for pattern, v in value.items():
            if isinstance(v, bool) or not isinstance(v, kind) or not math.isfinite(v) or v <= 0:
                raise InputError(f"{path}: {key}[{pattern!r}] is {v!r}, expected a positive "
                                 f"{'integer' if kind is int else 'number'}")


LORA_SUFFIXES = {".lora_A.weight": ("A", "linear"), ".lora_B.weight": ("B", "linear"),
                 ".lora_embedding_A": ("A", "embedding"), ".lora_embedding_B": ("B", "embedding")}
LORA_BIAS_SUFFIX = ".lora_B.bias"
TOKEN_ROWS_SUFFIX = ".token_adapter.trainable_tokens_delta"
MAGNITUDE_SUFFIX = ".lora_magnitude_vector"


def _split_key(key: str) -> tuple[str, str, int, str]:
    """'base_model.model.X.base_layer.lora_A.weight' -> ('X', 'A', nesting depth 1, 'linear');
    a full weight 'base_model.model.X.weight' (or X.base_layer.weight) -> ('X.weight', 'W', 0, 'full');
    trainable token rows -> ('X.weight', 'T', 0, 'rows')."""
    name = key[len(KEY_PREFIX):] if key.startswith(KEY_PREFIX) else key
    for suffix, (which, kind) in LORA_SUFFIXES.items():
        if name.endswith(suffix):
            module = name[: -len(suffix)]
            depth = 0
            while module.endswith(".base_layer"):
                module = module[: -len(".base_layer")]
                depth += 1
            return module, which, depth, kind
    if name.endswith(LORA_BIAS_SUFFIX):  # lora_bias: lora_B is a Linear with a bias
        module = name[: -len(LORA_BIAS_SUFFIX)]
        depth = 0
        while module.endswith(".base_layer"):
            module = module[: -len(".base_layer")]
            depth += 1
        return module, "b", depth, "bias"
    if name.endswith(TOKEN_ROWS_SUFFIX):
        return name[: -len(TOKEN_ROWS_SUFFIX)] + ".weight", "T", 0, "rows"
    if name.endswith(MAGNITUDE_SUFFIX) or name.endswith(MAGNITUDE_SUFFIX + ".weight"):
        module = name[: name.rindex(MAGNITUDE_SUFFIX)]
        while module.endswith(".base_layer"):
            module = module[: -len(".base_layer")]
        return module, "M", 0, "magnitude"
    if name.endswith((".weight", ".bias")):
        module, _, leaf = name.rpartition(".")
        if re.search(r"\.original_module(\.[^.]+)?$", module):
            # the wrapper's untrained original, saved beside the trained copy (save_embedding_layers)
            return f"{module}.{leaf}", "W", 0, "original"
        # PEFT saves modules_to_save under the module's own name; with save_embedding_layers it also
        # saves the wrapper's copy as X.modules_to_save[.adapter].weight (the same values)
        module = re.sub(r"\.modules_to_save(\.[^.]+)?$", "", module)
        if module.endswith(".base_layer"):
            module = module[: -len(".base_layer")]
        return f"{module}.{leaf}", "W", 0, "full"
    raise UnsupportedError(
        f"adapter tensor {key!r} is not a LoRA matrix (lora_A/lora_B, lora_embedding_A/B), a full weight "
        "(modules_to_save) or trainable token rows; other adapter kinds are not merged yet"
    )


def _aliased(module: str, renames: tuple[tuple[str, str], ...]) -> str:
    """An adapter's module name as the base checkpoint names it (the family's module aliases)."""
    for old, new in renames:
        if (module + ".").startswith(old):
            return (new + (module + ".")[len(old):])[:-1]
    return module


def _token_indices(config: Mapping[str, Any], target: str, path: Path) -> tuple[int, ...]:
    """The rows ``trainable_token_indices`` names for ``target`` (a list applies to the input embedding)."""
    spec = config.get("trainable_token_indices")
    module = target[: -len(".weight")]
    if isinstance(spec, list):
        ids = spec
    elif isinstance(spec, dict):
        ids = next((v for k, v in spec.items() if module == k or module.endswith("." + k)), None)
    else:
        ids = None
    if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
        raise InputError(f"{path / CONFIG_NAME}: trainable_token_indices {spec!r} does not list the token ids of "
                         f"{module!r} as non-negative integers, but the adapter holds trained rows for it")
    return tuple(ids)


def _targets_param(config: Mapping[str, Any], key: str) -> bool:
    return any(key == t or key.endswith("." + t) for t in (config.get("target_parameters") or []))


def load_adapter(folder: Path | str, base_shapes: Mapping[str, tuple[int, ...]], arch: Architecture,
                 allow: Collection[str] = ()) -> Adapter:
    """Read an adapter folder and match each A/B pair to a base tensor, checking shapes.

    `base_shapes` maps the base model's tensor names (as the BF16 checkpoint names them) to
    shapes. ``allow``: features of :data:`UNSUPPORTED_FEATURES` the caller handles itself; with
    "lora_bias" the lora_B biases are read into ``Adapter.lora_biases`` (a GGUF LoRA adapter
    names them and leaves them out; the merge refuses them).
    """
    folder = Path(folder)
    config = read_config(folder)
    check_config(config, folder / CONFIG_NAME, allow)
    if not (folder / WEIGHTS_NAME).exists() and (folder / "adapter_model.bin").exists():
        raise InputError(
            f"{folder / 'adapter_model.bin'}: a pickle file, which lora2gguf never unpickles (it can run code). "
            "Save the adapter as safetensors: model.save_pretrained(DIR, safe_serialization=True), or convert: "
            "python -c \"import torch; from safetensors.torch import save_file; "
            "save_file(torch.load('adapter_model.bin', weights_only=True), 'adapter_model.safetensors')\""
        )
    ckpt = Checkpoint.open(folder, single_name=WEIGHTS_NAME, index_name="adapter_model.safetensors.index.json")
    where = folder / WEIGHTS_NAME
    adapter = Adapter(folder, dict(config), ckpt)
    pairs: dict[tuple[str, int, str], dict[str, tuple[str, TensorInfo]]] = {}
    magnitudes: dict[str, TensorInfo] = {}
    base_shapes = dict(base_shapes)
    renames = arch.alias_renames(base_shapes)  # transformers renames some modules on loading
    for key, info in sorted(ckpt.tensors.items()):
        try:
            module, which, depth, kind = _split_key(key)
        except UnsupportedError as e:
            raise UnsupportedError(f"{where}: {e}") from None
        module = _aliased(module, renames)
        if kind == "original":
            continue
        if kind == "magnitude":
            magnitudes[module] = info
            continue
        if kind == "bias":
            if not config.get("lora_bias"):
                raise FormatError(f"{where}: {key} is a lora_B bias, but adapter_config.json says lora_bias="
                                  f"{config.get('lora_bias')!r}; save the adapter again with PEFT's save_pretrained")
            adapter.lora_biases[key] = info
            continue
        if kind == "full":
            if module in adapter.replaced:
                _same_values(adapter.replaced[module], info, where)
                continue
            _replace(adapter, base_shapes, module, key, info, where)
        elif kind == "rows":
            adapter.token_rows[module] = TokenRows(module, _token_indices(config, module, folder), info)
        else:
            pairs.setdefault((module, depth, kind), {})[which] = (key, info)
    for target, rows in adapter.token_rows.items():
        shape = base_shapes.get(target)
        if shape is None or len(shape) != 2 or rows.values.shape != (len(rows.indices), shape[1]) \
                or max(rows.indices, default=-1) >= shape[0]:
            raise InputError(f"{where}: trained token rows {rows.values.name} {rows.values.shape} for rows "
                             f"{list(rows.indices)[:8]} do not fit {target} {shape}. Is this adapter for another model?")

    r0, alpha0 = config["r"], config["lora_alpha"]
    rank_pattern = config.get("rank_pattern") or {}
    alpha_pattern = config.get("alpha_pattern") or {}
    rslora = bool(config.get("use_rslora"))
    fifo = bool(config.get("fan_in_fan_out"))
    for (module, depth, kind), ab in sorted(pairs.items()):
        if set(ab) != {"A", "B"}:
            missing = ({"A", "B"} - set(ab)).pop()
            raise FormatError(f"{where}: {module} has lora_{'AB'.replace(missing, '')} but no lora_{missing}")
        (a_key, a), (b_key, b) = ab["A"], ab["B"]
        if len(a.shape) != 2 or len(b.shape) != 2:
            raise FormatError(f"{where}: {a_key} and {b_key} must be 2-D, got {a.shape} and {b.shape}")
        linear_target = f"{module}.weight"
        if kind == "embedding":
            shape = base_shapes.get(linear_target)
            r = int(lora.pattern_value(rank_pattern, module, r0))
            alpha = float(lora.pattern_value(alpha_pattern, module, alpha0))
            if shape is None or len(shape) != 2 or a.shape != (r, shape[0]) or b.shape != (shape[1], r):
                raise InputError(
                    f"{where}: {module}: lora_embedding_A {a.shape} / lora_embedding_B {b.shape} do not fit the base "
                    f"embedding {linear_target} {shape} with rank {r}. Is this adapter for another model or size?")
            # delta = (B @ A)^T * s: the fan_in_fan_out form of a Linear pair (A (r, rows), B (cols, r))
            term = LoraTerm(linear_target, module, a, b, r, alpha, lora.scaling(alpha, r, rslora), "embedding",
                            fan_in_fan_out=True)
        elif depth == 0 and linear_target in base_shapes:
            shape = base_shapes[linear_target]
            if len(shape) != 2:
                raise InputError(
                    f"{where}: {a_key} / {b_key}: a LoRA pair on {linear_target} {shape}, which is not a matrix (a "
                    "norm, a bias or another vector); PEFT trains LoRA on weight matrices only. Is this adapter for "
                    "another model, or written by another tool? Remove the pair, or merge the adapter with the tool "
                    "that wrote it and convert the merged model.")
            out_f, in_f = (shape[1], shape[0]) if fifo else (shape[0], shape[1])
            r = int(lora.pattern_value(rank_pattern, module, r0))
            alpha = float(lora.pattern_value(alpha_pattern, module, alpha0))
            if a.shape != (r, in_f) or b.shape != (out_f, r):
                raise InputError(
                    f"{where}: {module}: lora_A {a.shape} / lora_B {b.shape} do not fit the base weight "
                    f"{linear_target} {shape} with rank {r}. Is this adapter for another model or size?"
                )
            term = LoraTerm(linear_target, module, a, b, r, alpha, lora.scaling(alpha, r, rslora), "linear",
                            fan_in_fan_out=fifo)
        else:
            wrapped = arch.wrapped_params or arch.expert_params
            targeted = [p for p in wrapped if f"{module}.{p}" in base_shapes and _targets_param(config, f"{module}.{p}")]
            if depth >= len(targeted):
                raise InputError(
                    f"{where}: adapter tensors for {module!r} match no tensor of the base model "
                    f"(looked for {linear_target!r} and the expert parameters {list(wrapped)} named in "
                    "target_parameters). Is this adapter for another model?"
                )
            param = targeted[len(targeted) - 1 - depth]
            target = f"{module}.{param}"
            shape = base_shapes[target]
            if param not in arch.expert_params:  # a 2-D parameter beside the experts: one matrix to PEFT
                r = int(lora.pattern_value(rank_pattern, target, r0))
                alpha = float(lora.pattern_value(alpha_pattern, target, alpha0))
                if len(shape) != 2 or a.shape != (r, shape[1]) or b.shape != (shape[0], r):
                    raise InputError(
                        f"{where}: {a_key} {a.shape} / {b_key} {b.shape} do not fit {target} {shape} with rank {r}. "
                        "Is this adapter for another model or size?")
                term = LoraTerm(target, a_key.rsplit(".lora_A", 1)[0], a, b, r, alpha,
                                lora.scaling(alpha, r, rslora), "linear")
                adapter.terms.setdefault(term.target, []).append(term)
                continue
            if len(shape) != 3:
                raise InputError(f"{where}: {target} has shape {shape}; expected a 3-D (experts, ..., ...) parameter")
            n_exp, in_f, out_f = shape if arch.expert_layout == "in_out" else (shape[0], shape[2], shape[1])
            r = int(lora.pattern_value(rank_pattern, target, r0))
            alpha = float(lora.pattern_value(alpha_pattern, target, alpha0))
            if a.shape != (r * n_exp, in_f) or b.shape != (out_f, r * n_exp):
                raise InputError(
                    f"{where}: {a_key} {a.shape} / {b_key} {b.shape} do not fit {target} {shape} "
                    f"({n_exp} experts, rank {r}: expected A {(r * n_exp, in_f)}, B {(out_f, r * n_exp)}): "
                    f"{_expert_layout_problem(a.shape, b.shape, r, n_exp, in_f, out_f)}. lora2gguf does not "
                    "guess the per-expert layout: use the base the adapter was trained on (the same expert "
                    "count), or an adapter_config.json whose r / rank_pattern match the saved weights."
                )
            term = LoraTerm(target, a_key.rsplit(".lora_A", 1)[0], a, b, r, alpha,
                            lora.scaling(alpha, r, rslora), "experts", num_experts=n_exp,
                            layout=arch.expert_layout)
        mag = magnitudes.pop(module, None)
        if mag is not None:
            term = _with_magnitude(term, mag, where)
        adapter.terms.setdefault(term.target, []).append(term)
    if magnitudes:
        first = next(iter(magnitudes.values()))
        raise FormatError(f"{where}: DoRA magnitude {first.name} has no LoRA pair beside it")
    if bool(config.get("use_dora")) != any(t.magnitude is not None for t in adapter.all_terms):
        raise FormatError(f"{where}: adapter_config.json says use_dora={config.get('use_dora')!r}, but the "
                          "weights " + ("hold no" if config.get("use_dora") else "hold") + " DoRA magnitude vectors; "
                          "save the adapter again with PEFT's save_pretrained")
    if not adapter.terms and not adapter.replaced and not adapter.token_rows:
        raise InputError(f"{where}: holds no LoRA tensors")
    return adapter


def _expert_layout_problem(a_shape, b_shape, r: int, n_exp: int, in_f: int, out_f: int) -> str:
    """What the saved shapes of an expert LoRA pair say, against the base's expert count and the
    configured rank: stacked factors hold rank x experts rows, which cannot be split otherwise."""
    rows, cols = a_shape[0], b_shape[1]
    if rows != cols:
        return f"lora_A has {rows} rows but lora_B {cols} columns; they must be equal (rank x experts)"
    if (a_shape[1], b_shape[0]) != (in_f, out_f):
        return (f"the pair maps {a_shape[1]} inputs to {b_shape[0]} outputs, each expert of the parameter "
                f"{in_f} to {out_f}")
    if rows % n_exp:
        return f"lora_A's {rows} rows are not a multiple of the base's {n_exp} experts"
    other = f" or {rows // r} experts at rank {r}" if rows % r == 0 else ""
    return (f"lora_A's {rows} rows are {n_exp} experts at rank {rows // n_exp}{other}, but adapter_config.json "
            f"gives this parameter rank {r}")


def _with_magnitude(term: LoraTerm, mag: TensorInfo, where: Path) -> LoraTerm:
    """DoRA on a Linear layer: one magnitude per output row (PEFT normalizes each output row of
    W + delta). DoRA on an embedding or a Conv1D normalizes columns, which a row-by-row merge
    cannot do; on expert parameters PEFT refuses DoRA, so there is nothing to match."""
    from dataclasses import replace

    if term.kind == "experts":
        raise UnsupportedError(
            f"{where}: {mag.name}: DoRA on the expert parameter {term.target} (target_parameters) is not merged: "
            "PEFT itself does not apply DoRA to target_parameters (its ParamWrapper refuses use_dora), so there "
            "is no reference merge to match. Train the experts with plain LoRA (use_dora false), or DoRA on "
            "target_modules alone (no target_parameters), or convert a model you merged yourself.")
    if term.kind != "linear" or term.fan_in_fan_out:
        what = "an embedding" if term.kind == "embedding" else "a fan_in_fan_out (Conv1D) layer"
        raise UnsupportedError(
            f"{where}: {mag.name}: DoRA on {what} ({term.target}) is not merged by lora2gguf (PEFT normalizes "
            "it over columns, which a row-by-row merge cannot do). Merge with PEFT (merge_and_unload) and "
            "convert the merged model, or train DoRA on the Linear layers only.")
    out_rows = term.b.shape[0]
    if tuple(mag.shape) != (out_rows,):
        raise InputError(f"{where}: DoRA magnitude {mag.name} {mag.shape} does not fit {term.target} "
                         f"({out_rows} output rows). Is this adapter for another model?")
    return replace(term, magnitude=mag)


def saved_vocab_rows(folder: Path | str) -> int | None:
    """The rows of the embedding the adapter saves in full (a fine-tune that resized its
    vocabulary), from the safetensors header alone; None when it saves none. A reference model
    must be resized to this before PEFT can load the adapter."""
    folder = Path(folder)
    try:
        ckpt = Checkpoint.open(folder, single_name=WEIGHTS_NAME, index_name="adapter_model.safetensors.index.json")
    except Exception:  # noqa: BLE001 - doctor reports unreadable adapters; here: no resize
        return None
    for key, info in ckpt.tensors.items():
        name = key[len(KEY_PREFIX):] if key.startswith(KEY_PREFIX) else key
        name = name.replace(".base_layer.", ".")
        if name.endswith("embed_tokens.weight") and len(info.shape) == 2:
            return int(info.shape[0])
    return None


#: tensors whose rows are the vocabulary: a fine-tune that added tokens saves them with more rows
_VOCAB_ROWS = ("embed_tokens.weight", "lm_head.weight", "wte.weight", "embed_out.weight")


def _same_values(a: TensorInfo, b: TensorInfo, where: Path) -> None:
    """Two saved copies of one trained module must agree (they are small: embeddings at most)."""
    from .safetensors_io import read_raw

    if a.shape != b.shape or a.dtype != b.dtype or not np.array_equal(read_raw(a), read_raw(b)):
        raise FormatError(f"{where}: {a.name} and {b.name} are two saved copies of one trained module but differ; "
                          "save the adapter again with PEFT's save_pretrained")


def _replace(adapter: Adapter, base_shapes: dict[str, tuple[int, ...]], target: str, key: str, info: TensorInfo,
             where: Path) -> None:
    """A full weight of the adapter replaces the base tensor ``target``; embedding-like tensors may
    have more (or fewer) rows (a resized vocabulary), every other tensor the base's shape."""
    shape = base_shapes.get(target)
    if shape is None:
        raise InputError(f"{where}: {key} replaces {target!r}, which the base checkpoint does not hold. "
                         "Is this adapter for another model?")
    resizable = target.endswith(_VOCAB_ROWS) and len(shape) == 2 and len(info.shape) == 2
    if tuple(info.shape) != tuple(shape) and not (resizable and info.shape[1] == shape[1]):
        raise InputError(f"{where}: {key} {info.shape} does not fit the base tensor {target} {shape}. "
                         "Is this adapter for another model or size?")
    adapter.replaced[target] = info
    base_shapes[target] = tuple(info.shape)
