"""The base model's tensors as the BF16 checkpoint names and shapes them, whatever the storage.

A `Source` is one logical tensor with a reader for slabs of its leading axis, in float32:
- plain F32/F16/BF16 tensors are read as they are;
- MXFP4 experts (`X_blocks` + `X_scales`, as MXFP4 checkpoints store them) are decoded exactly, one
  expert slab at a time, into the (E, in, out) layout of the BF16 checkpoints;
- bitsandbytes 4-bit Linear weights (NF4/FP4, nested absmax or not) and LLM.int8 weights are
  decoded in numpy (lossy at source: the merge inherits the 4-bit error).
FP8, GPTQ/AWQ and other formats are refused with the way out.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Mapping

import numpy as np

from . import numerics
from .errors import UnsupportedError
from .safetensors_io import FLOAT_DTYPES, FP8_DTYPES, Checkpoint, TensorInfo, map_raw, read_raw, to_f32

Reader = Callable[[slice | None], np.ndarray]

BNB_SUFFIXES = (".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map", ".SCB", ".weight_format")
GPTQ_SUFFIXES = (".qweight", ".qzeros", ".g_idx")


@dataclass(frozen=True)
class Source:
    name: str
    shape: tuple[int, ...]
    storage: str  # "BF16", "F32", "F16", "MXFP4", "BNB_NF4", "BNB_FP4", "BNB_INT8"
    read: Reader  # slab of the leading axis (None: all) -> float32
    stored: tuple[TensorInfo, ...]  # the stored tensors behind it
    slab_cost: int = 1  # extra float32 copies decoding needs (memory planning)
    # MXFP4 only: a slab of the stored tensor repacked, without decoding, as ggml MXFP4 blocks
    # (E, rows, G*17) in the stored (output-major) row order; see numerics.mxfp4_hf_to_ggml
    read_packed: Reader | None = None
    # plain F32/F16/BF16 only: a slab as stored (BF16 as uint16 bits), for tensors the adapter
    # leaves alone and the GGUF keeps in the same type (copied bit for bit, no float32 round trip),
    # and for the fused BF16 merge (bf16_merge); read-only
    read_stored: Reader | None = None
    origin: str = "base"  # "adapter": a full weight of the adapter replaces the base's (modules_to_save)

    @property
    def stored_bytes(self) -> int:
        return sum(t.nbytes for t in self.stored)

    @property
    def lossy(self) -> bool:
        return self.storage.startswith("BNB")

    def row_bytes_f32(self) -> int:
        return 4 * math.prod(self.shape[1:]) if self.shape else 4


def _plain(info: TensorInfo) -> Source:
    def read(rows: slice | None) -> np.ndarray:
        return to_f32(map_raw(info, rows=rows), info.dtype, name=info.name)  # to_f32 makes the copy

    def read_stored(rows: slice | None) -> np.ndarray:
        return map_raw(info, rows=rows)  # read-only, mapped for as long as the array lives

    return Source(info.name, info.shape, info.dtype, read, (info,), read_stored=read_stored)


def _mxfp4(name: str, blocks: TensorInfo, scales: TensorInfo) -> Source:
    if blocks.dtype != "U8" or scales.dtype != "U8" or len(blocks.shape) != 4 or blocks.shape[-1] != 16 \
            or scales.shape != blocks.shape[:3]:
        raise UnsupportedError(
            f"{blocks.path.name}: {blocks.name} {blocks.shape} {blocks.dtype} / {scales.name} {scales.shape} "
            f"{scales.dtype} is not the MXFP4 checkpoint layout (uint8 blocks (E, rows, G, 16), scales (E, rows, G))"
        )
    e, rows, g, _ = blocks.shape
    shape = (e, g * 32, rows)  # decoded and transposed per expert: the BF16 checkpoint's layout

    def read(sl: slice | None) -> np.ndarray:
        return numerics.decode_mxfp4_expert(read_raw(blocks, rows=sl), read_raw(scales, rows=sl), name=name)

    def read_packed(sl: slice | None) -> np.ndarray:
        return numerics.mxfp4_hf_to_ggml(read_raw(blocks, rows=sl), read_raw(scales, rows=sl), name=name)

    return Source(name, shape, "MXFP4", read, (blocks, scales), slab_cost=2, read_packed=read_packed)


def _bnb4(name: str, ckpt: Checkpoint, keys: list[str]) -> Source:
    infos = tuple(ckpt.tensors[k] for k in keys)

    def load() -> dict:
        return {k: read_raw(ckpt.tensors[k]) for k in keys}

    state = numerics.parse_bnb_quant_state({k: read_raw(ckpt.tensors[k]) if "quant_state" in k else np.empty(0)
                                            for k in keys}, name)
    shape = tuple(state["shape"])

    def read(rows: slice | None) -> np.ndarray:
        full = numerics.decode_bnb_4bit_state(load(), name)
        return full if rows is None else np.ascontiguousarray(full[rows])

    return Source(name, shape, f"BNB_{state['quant_type'].upper()}", read, infos, slab_cost=2)


def _bnb8(name: str, weight: TensorInfo, scb: TensorInfo) -> Source:
    def read(rows: slice | None) -> np.ndarray:
        w = read_raw(weight, rows=rows)
        s = read_raw(scb, rows=rows).astype(np.float32)
        return numerics.decode_bnb_int8(w, s, name=name)

    return Source(name, weight.shape, "BNB_INT8", read, (weight, scb))


def detect_unsupported(names: Mapping[str, TensorInfo], folder) -> None:
    """Raise for stored formats lora2gguf cannot decode (FP8, GPTQ/AWQ)."""
    fp8 = [t.name for t in names.values() if t.dtype in FP8_DTYPES]
    if fp8 or any(n.endswith("weight_scale_inv") for n in names):
        first = fp8[0] if fp8 else next(n for n in names if n.endswith("weight_scale_inv"))
        raise UnsupportedError(
            f"{folder}: the base stores FP8 weights (e.g. {first!r}); lora2gguf does not decode FP8 yet. "
            "Use the BF16 release of this base model."
        )
    gptq = [n for n in names if n.endswith(GPTQ_SUFFIXES)]
    if gptq:
        raise UnsupportedError(
            f"{folder}: the base is GPTQ/AWQ-quantized (e.g. {gptq[0]!r}); it cannot be merged exactly. "
            "Use the BF16 release of this base model."
        )


def with_rows(src: Source, indices: tuple[int, ...], values: TensorInfo) -> Source:
    """``src`` with rows ``indices`` replaced by ``values`` (PEFT's trainable tokens: the trained
    values of those rows). Read as float32 values (a stored copy would have to round them)."""
    idx = np.asarray(indices, dtype=np.intp)

    def read(rows: slice | None) -> np.ndarray:
        x = src.read(rows)
        x = np.array(x, dtype=np.float32, copy=True)
        lo, hi = (0, x.shape[0]) if rows is None else (rows.start or 0, rows.stop)
        sel = (idx >= lo) & (idx < hi)
        if sel.any():
            v = to_f32(read_raw(values), values.dtype, name=values.name)
            x[idx[sel] - lo] = v[sel]
        return x

    return Source(src.name, src.shape, src.storage, read, src.stored + (values,), src.slab_cost,
                  origin="adapter")


def apply_adapter(sources: Mapping[str, Source], adapter) -> dict[str, Source]:
    """The base's sources with the adapter's full weights (modules_to_save, resized embeddings)
    and trained token rows in place."""
    out = dict(sources)
    for name, info in adapter.replaced.items():
        src = _plain(info)
        out[name] = Source(name, src.shape, src.storage, src.read, src.stored, read_stored=src.read_stored,
                           origin="adapter")
    for name, rows in adapter.token_rows.items():
        out[name] = with_rows(out[name], rows.indices, rows.values)
    return out


def logical_tensors(ckpt: Checkpoint) -> dict[str, Source]:
    """All tensors of the base in BF16-checkpoint naming, each with a float32 slab reader."""
    tensors = ckpt.tensors
    detect_unsupported(tensors, ckpt.folder)
    out: dict[str, Source] = {}
    used: set[str] = set()
    for name in sorted(tensors):
        if name.endswith("_blocks") and name[: -len("_blocks")] + "_scales" in tensors:
            base = name[: -len("_blocks")]
            out[base] = _mxfp4(base, tensors[name], tensors[base + "_scales"])
            used.update({name, base + "_scales"})
        elif ".quant_state.bitsandbytes__" in name:
            weight = name.split(".quant_state.")[0]
            keys = [k for k in tensors if k == weight or k.startswith(weight + ".")]
            out[weight] = _bnb4(weight, ckpt, keys)
            used.update(keys)
        elif name.endswith(".SCB"):
            weight = name[: -len(".SCB")] + ".weight"
            out[weight] = _bnb8(weight, tensors[weight], tensors[name])
            used.update({weight, name})
            used.update(k for k in tensors if k.startswith(weight + "_format") or k == name[:-4] + ".weight_format")
    for name, info in tensors.items():
        if name in used or name in out:
            continue
        if info.dtype not in FLOAT_DTYPES:
            raise UnsupportedError(
                f"{info.path.name}: tensor {name!r} is stored as {info.dtype}, which is not a float weight and "
                "not a layout lora2gguf decodes (MXFP4 blocks/scales, bitsandbytes 4/8-bit)"
            )
        out[name] = _plain(info)
    return out
