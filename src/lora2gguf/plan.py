"""The plan: for every source tensor, the LoRA terms that touch it, the layout transform, the GGUF
tensors it becomes (names, shapes, types) and the slab size. Decided before a byte is read."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Mapping

import gguf
import numpy as np

from .adapter import Adapter, LoraTerm
from .arch import Architecture, block_id
from .errors import InputError, UnsupportedError
from .sources import Source

OUTTYPES: dict[str, gguf.GGMLQuantizationType] = {
    "f32": gguf.GGMLQuantizationType.F32,
    "f16": gguf.GGMLQuantizationType.F16,
    "bf16": gguf.GGMLQuantizationType.BF16,
}
FILE_TYPES: dict[str, gguf.LlamaFileType] = {
    "f32": gguf.LlamaFileType.ALL_F32,
    "f16": gguf.LlamaFileType.MOSTLY_F16,
    "bf16": gguf.LlamaFileType.MOSTLY_BF16,
}
DEFAULT_SLAB_BYTES = 64 * 1024 * 1024

# --keep-mxfp4: MXFP4 is stored output-major, (E, out, in) rows, which is GGUF's orientation, so
# the transform a decoded expert tensor needs (transpose, or split + transpose) becomes a plain
# row operation on the repacked ggml blocks (E, rows, G*17).
PACKED_TRANSFORMS = {
    "transpose": lambda x: (x,),
    "transpose_split_interleaved": lambda x: (np.ascontiguousarray(x[:, 0::2]), np.ascontiguousarray(x[:, 1::2])),
}


@dataclass(frozen=True)
class OutTensor:
    name: str  # GGUF name
    shape: tuple[int, ...]  # numpy order
    qtype: gguf.GGMLQuantizationType

    @property
    def nbytes(self) -> int:
        block, size = gguf.GGML_QUANT_SIZES[self.qtype]
        return math.prod(self.shape) // block * size

    @property
    def row_nbytes(self) -> int:
        """Bytes per index of the leading axis."""
        return self.nbytes // self.shape[0] if self.shape and self.shape[0] else self.nbytes


@dataclass(frozen=True)
class Step:
    source: Source
    terms: tuple[LoraTerm, ...]
    transform: str
    outputs: tuple[OutTensor, ...]
    slab_rows: int  # rows of the leading axis per slab (0: the whole tensor at once)
    packed: bool = False  # --keep-mxfp4: ggml MXFP4 blocks repacked from the source, never decoded


@dataclass
class Plan:
    arch: Architecture
    config: Mapping
    outtype: str
    steps: list[Step]
    adapter: Adapter | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def kept_mxfp4(self) -> list[str]:
        """Source tensors written as MXFP4 without decoding (--keep-mxfp4)."""
        return [s.source.name for s in self.steps if s.packed]

    @property
    def file_type(self) -> gguf.LlamaFileType:
        """general.file_type: as llama.cpp's converter says it for an MXFP4 base whose experts stay MXFP4."""
        return gguf.LlamaFileType.MOSTLY_MXFP4_MOE if self.kept_mxfp4 else FILE_TYPES[self.outtype]

    @property
    def outputs(self) -> list[OutTensor]:
        return [o for s in self.steps for o in s.outputs]

    @property
    def bytes_to_read(self) -> int:
        return sum(s.source.stored_bytes for s in self.steps)

    @property
    def gguf_tensor_bytes(self) -> int:
        return sum(o.nbytes for o in self.outputs)

    @property
    def peak_slab_bytes(self) -> int:
        peak = 0
        for s in self.steps:
            rows = s.slab_rows or (s.source.shape[0] if s.source.shape else 1)
            row = _packed_row_bytes(s.source) * 3 if s.packed else s.source.row_bytes_f32() * (3 + s.source.slab_cost)
            peak = max(peak, rows * row)
        return peak


def gguf_name(arch: Architecture, name_map: gguf.TensorNameMap, hf_name: str) -> tuple[str, gguf.MODEL_TENSOR]:
    for suffix in (".weight", ".bias"):
        if hf_name.endswith(suffix):
            stem = hf_name[: -len(suffix)]
            break
    else:
        stem, suffix = hf_name, ""
    found = name_map.get_type_and_name(stem)
    if found is None:
        raise UnsupportedError(
            f"tensor {hf_name!r} has no GGUF name for architecture {arch.gguf_arch_name}; this checkpoint has "
            "tensors lora2gguf does not know (a different model variant?)"
        )
    kind, name = found
    return name + suffix, kind


def output_qtype(arch: Architecture, name: str, kind: gguf.MODEL_TENSOR, ndim: int, outtype: str) -> gguf.GGMLQuantizationType:
    """The rule llama.cpp's converter applies: 1-D tensors, norms, non-weights and some
    architecture-specific tensors (the MoE router) stay F32; the rest take the output type."""
    if ndim <= 1 or name.endswith("_norm.weight") or not name.endswith(".weight") or kind in arch.f32_tensors:
        return gguf.GGMLQuantizationType.F32
    return OUTTYPES[outtype]


def _packed_row_bytes(src: Source) -> int:
    """Bytes of one leading-axis index (one expert) of an MXFP4 source repacked as ggml blocks."""
    rows = src.shape[0] if src.shape else 1
    return sum(t.nbytes for t in src.stored) // max(rows, 1)


def _check_keep_mxfp4(sources: Mapping[str, Source], terms: Mapping[str, tuple[LoraTerm, ...]]) -> list[str]:
    """The MXFP4 sources --keep-mxfp4 keeps; refuses when there are none or the adapter changes one."""
    kept = sorted(n for n, s in sources.items() if s.storage == "MXFP4")
    if not kept:
        raise InputError("--keep-mxfp4: the base has no MXFP4 tensors (no *_blocks/*_scales pairs); "
                         "run without --keep-mxfp4")
    touched = [n for n in kept if terms.get(n)]
    if touched:
        more = f" and {len(touched) - 1} more" if len(touched) > 1 else ""
        raise InputError(
            f"--keep-mxfp4: the adapter changes the MXFP4 expert tensor {touched[0]!r}{more} "
            "(target_parameters on mlp.experts), so the experts must be decoded and merged; they cannot stay "
            "MXFP4 without losing the fine-tune. Run without --keep-mxfp4 (the experts are decoded exactly and "
            "merged in BF16), and add --quant MXFP4_MOE for a file with MXFP4 experts."
        )
    for n in kept:
        if sources[n].read_packed is None:
            raise UnsupportedError(f"--keep-mxfp4: {n!r} cannot be repacked without decoding")
    return kept


def make_plan(arch: Architecture, config: Mapping, sources: Mapping[str, Source], adapter: Adapter | None,
              outtype: str = "bf16", slab_bytes: int = DEFAULT_SLAB_BYTES, keep_mxfp4: bool = False) -> Plan:
    if outtype not in OUTTYPES:
        raise InputError(f"--outtype {outtype!r}: choose one of {', '.join(OUTTYPES)}")
    n_layers = int(config.get("num_hidden_layers", 0))
    name_map = gguf.get_tensor_name_map(arch.gguf_arch, n_layers)
    terms = dict(adapter.terms) if adapter else {}
    keep = set(_check_keep_mxfp4(sources, terms)) if keep_mxfp4 else set()
    steps: list[Step] = []
    seen: dict[str, str] = {}
    for name in sorted(sources, key=lambda n: (block_id(n) if block_id(n) is not None else -1, n)):
        src = sources[name]
        found = arch.rule_for(name)
        if found:
            prefix, rule = found
            hf_outs, transform = [prefix + o for o in rule.outputs], rule.transform
        else:
            hf_outs, transform = [name], "copy"
        probe = arch.transforms[transform](np.zeros((0,) + tuple(src.shape[1:]), np.float32)) if src.shape else None
        outs = []
        for i, hf_out in enumerate(hf_outs):
            gname, kind = gguf_name(arch, name_map, hf_out)
            if gname in seen:
                raise InputError(f"tensors {seen[gname]!r} and {name!r} both map to GGUF tensor {gname!r}")
            seen[gname] = name
            shape = (src.shape[0],) + probe[i].shape[1:] if src.shape else ()
            outs.append(OutTensor(gname, tuple(shape), output_qtype(arch, gname, kind, len(shape), outtype)))
        packed = name in keep
        if packed:
            if transform not in PACKED_TRANSFORMS:
                raise UnsupportedError(f"--keep-mxfp4: no repacked layout for {name!r} (transform {transform!r})")
            outs = [OutTensor(o.name, o.shape, gguf.GGMLQuantizationType.MXFP4) for o in outs]
            row = _packed_row_bytes(src) * 3  # raw blocks+scales, the repacked copy, the split pieces
            slab_rows = max(1, min(src.shape[0], slab_bytes // max(row, 1)))
        elif len(src.shape) <= 1:
            slab_rows = 0
        else:
            row = src.row_bytes_f32() * (1 + src.slab_cost)
            slab_rows = max(1, min(src.shape[0], slab_bytes // max(row, 1)))
        steps.append(Step(src, tuple(terms.pop(name, ())), transform, tuple(outs), slab_rows, packed))
    if terms:
        target = next(iter(terms))
        raise InputError(f"the adapter changes {target!r}, which the base checkpoint does not hold")
    plan = Plan(arch, config, outtype, steps, adapter)
    if keep:
        n_out = sum(len(s.outputs) for s in steps if s.packed)
        plan.notes.append(
            f"--keep-mxfp4: the MoE experts ({n_out} tensors) are written as MXFP4, repacked from the base "
            "without decoding (the adapter does not change them); general.file_type is MOSTLY_MXFP4_MOE")
    return plan
