"""The plan: every GGUF tensor decided before a byte is read.

For each output tensor: its name, shape and type; the source tensors it is made of (with the
LoRA terms that touch each); per output matrix, the source matrix and the :class:`layout.View`
that cuts it out (which also says what happens to the LoRA factors); a constant to add
(norms stored as ``w + 1``); or, for tensors made from the config alone (rotary frequency
factors), the values. The stream (stream.py) executes it block by block; nothing here reads tensor data.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Mapping

import gguf
import numpy as np

from . import layout
from .adapter import Adapter, LoraTerm
from .arch import Family, Stack, block_id
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
    def matrix_nbytes(self) -> int:
        """Bytes of one matrix (one expert of a 3-D tensor; the whole tensor otherwise)."""
        return self.nbytes // layout.matrix_count(self.shape)

    @property
    def row_nbytes(self) -> int:
        """Bytes of one row of a matrix (one element of a vector)."""
        rows = layout.matrix_shape(self.shape)[0] if self.shape else 1
        return self.matrix_nbytes // max(rows, 1)


@dataclass(frozen=True)
class Bound:
    """A LoRA term as one source tensor sees it: the term's delta for matrix ``matrix`` (an
    expert; None: the source's own matrix), cut by ``view`` (the rows of a fused expert
    parameter that a per-expert tensor is)."""

    term: LoraTerm
    matrix: int | None = None
    view: layout.View = layout.View()


@dataclass(frozen=True)
class Input:
    """A source tensor and the LoRA terms that change it."""

    source: Source
    terms: tuple[Bound, ...] = ()


@dataclass(frozen=True)
class TensorPlan:
    tensor: OutTensor
    inputs: tuple[Input, ...]
    parts: tuple[layout.Part, ...]  # one per output matrix; () for generated tensors
    add: float = 0.0
    values: np.ndarray | None = None  # generated tensors: the float32 values
    packed: bool = False  # --keep-mxfp4: ggml MXFP4 blocks repacked from the source, never decoded
    block_rows: int = 0  # output rows per unit of work (0: a whole matrix)
    op: str = "Copy"  # the layout operation, for the record
    kind: gguf.MODEL_TENSOR | None = None  # gguf-py's tensor kind (TOKEN_EMBD, ATTN_V, ...)

    @property
    def touched(self) -> bool:
        return any(i.terms for i in self.inputs)

    @property
    def out_rows(self) -> int:
        return layout.matrix_shape(self.tensor.shape)[0] if self.tensor.shape else 1

    def blocks(self) -> list[tuple[int, slice]]:
        """(matrix, output rows) units in file order."""
        if self.values is not None or not self.parts:
            return [(0, slice(0, self.out_rows))]
        n = self.out_rows
        step = self.block_rows or n
        return [(e, slice(a, min(n, a + step))) for e in range(len(self.parts)) for a in range(0, n, step)]


@dataclass
class Plan:
    family: Family
    config: Mapping
    outtype: str
    tensors: list[TensorPlan]
    adapter: Adapter | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def arch(self) -> Family:
        return self.family

    @property
    def kept_mxfp4(self) -> list[str]:
        """Source tensors written as MXFP4 without decoding (--keep-mxfp4)."""
        return sorted({i.source.name for t in self.tensors if t.packed for i in t.inputs})

    @property
    def file_type(self) -> gguf.LlamaFileType:
        """general.file_type: as llama.cpp's converter says it for an MXFP4 base whose experts stay MXFP4."""
        return gguf.LlamaFileType.MOSTLY_MXFP4_MOE if self.kept_mxfp4 else FILE_TYPES[self.outtype]

    @property
    def outputs(self) -> list[OutTensor]:
        return [t.tensor for t in self.tensors]

    @property
    def sources(self) -> list[Source]:
        seen: dict[str, Source] = {}
        for t in self.tensors:
            for i in t.inputs:
                seen.setdefault(i.source.name, i.source)
        return list(seen.values())

    @property
    def bytes_to_read(self) -> int:
        return sum(s.stored_bytes for s in self.sources)

    @property
    def gguf_tensor_bytes(self) -> int:
        return sum(o.nbytes for o in self.outputs)


def gguf_name(family: Family, name_map: gguf.TensorNameMap, hf_name: str) -> tuple[str, gguf.MODEL_TENSOR]:
    hf_name = family.text_name(hf_name)
    for suffix in (".weight", ".bias"):
        if hf_name.endswith(suffix):
            stem = hf_name[: -len(suffix)]
            break
    else:
        stem, suffix = hf_name, ""
    found = name_map.get_type_and_name(stem)
    if found is None:
        raise UnsupportedError(
            f"tensor {hf_name!r} has no GGUF name for architecture {family.gguf_arch_name}; this checkpoint has "
            "tensors lora2gguf does not know (a different model variant?)"
        )
    kind, name = found
    return name + suffix, kind


def output_qtype(family: Family, name: str, kind: gguf.MODEL_TENSOR | None, ndim: int,
                 outtype: str) -> gguf.GGMLQuantizationType:
    """The rule llama.cpp's converter applies: 1-D tensors, norms, non-weights and some
    family-specific tensors (MoE routers) stay F32; the rest take the output type."""
    if ndim <= 1 or name.endswith("_norm.weight") or not name.endswith(".weight") or kind in family.f32_tensors:
        return gguf.GGMLQuantizationType.F32
    return OUTTYPES[outtype]


def _stack_groups(family: Family, sources: Mapping[str, Source], config: Mapping
                  ) -> dict[str, tuple[tuple[str, Stack], list[str]]]:
    """Per-expert tensors of the family's stacks: name -> ((prefix, stack), the members in
    expert order). Every expert 0..n-1 must be there, with one shape."""
    groups: dict[tuple[str, Stack], dict[int, str]] = {}
    for name in sources:
        for stack in family.stacks:
            hit = stack.match(name)
            if hit is not None:
                groups.setdefault((hit[0], stack), {})[hit[1]] = name
    from .hparams import find

    want = find(config, ("num_local_experts", "num_experts", "n_routed_experts"), "config.json", required=False)
    out: dict[str, tuple[tuple[str, Stack], list[str]]] = {}
    for key, by_e in groups.items():
        n = max(by_e) + 1
        missing = [e for e in range(n) if e not in by_e]
        if missing or (want is not None and n != want):
            raise InputError(
                f"the checkpoint holds {len(by_e)} experts of {key[0]}{key[1].template} "
                f"(indices {sorted(by_e)[:4]}...{sorted(by_e)[-1]}), config.json says {want}: a shard is missing "
                "or the config belongs to another model. Download the checkpoint again.")
        members = [by_e[e] for e in range(n)]
        shapes = {tuple(sources[m].shape) for m in members}
        if len(shapes) != 1:
            raise InputError(f"the experts of {key[0]}{key[1].template} have different shapes {sorted(shapes)}; "
                             "the checkpoint is damaged")
        for m in members:
            out[m] = (key, members)
    return out


def _route_fused(family: Family, sources: Mapping[str, Source], terms: dict[str, list[LoraTerm]]
                 ) -> dict[str, tuple[Bound, ...]]:
    """LoRA terms on fused expert parameters (transformers 5.x) of a base saved per expert: each
    expert's tensors get the term's delta of that expert, cut to their rows of the fused matrix."""
    out: dict[str, list[Bound]] = {}
    for target in [t for t in terms if t not in sources]:
        for f in family.fused:
            if not target.endswith(f.name):
                continue
            prefix = target[: -len(f.name)]
            first = [prefix + p.format(e=0) for p in f.parts]
            if not all(n in sources for n in first):
                continue
            for term in terms.pop(target):
                for e in range(term.num_experts):
                    off = 0
                    for p in f.parts:
                        name = prefix + p.format(e=e)
                        if name not in sources:
                            raise InputError(f"the adapter changes {target!r} ({term.num_experts} experts), but the "
                                             f"base checkpoint has no {name!r}")
                        rows = sources[name].shape[0]
                        out.setdefault(name, []).append(
                            Bound(term, e, layout.View(rows=layout.Span(off, off + rows))))
                        off += rows
            break
    return {k: tuple(v) for k, v in out.items()}


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


def _block_rows(t: OutTensor, source: Source, slab_bytes: int, packed: bool) -> int:
    """Output rows per unit of work: about ``slab_bytes`` of float32 work per unit."""
    rows, cols = layout.matrix_shape(t.shape) if t.shape else (1, 1)
    per_row = (t.row_nbytes * 3) if packed else cols * 4 * (3 + source.slab_cost)
    return max(1, min(rows, slab_bytes // max(per_row, 1)))


def _sorted_names(names) -> list[str]:
    return sorted(names, key=lambda n: (block_id(n) if block_id(n) is not None else -1, n))


def make_plan(family: Family, config: Mapping, sources: Mapping[str, Source], adapter: Adapter | None,
              outtype: str = "bf16", slab_bytes: int = DEFAULT_SLAB_BYTES, keep_mxfp4: bool = False) -> Plan:
    """The plan for a (normalized) config, the base's sources and the adapter's terms."""
    if outtype not in OUTTYPES:
        raise InputError(f"--outtype {outtype!r}: choose one of {', '.join(OUTTYPES)}")
    n_layers = int(config.get("num_hidden_layers", 0))
    name_map = gguf.get_tensor_name_map(family.gguf_arch, n_layers)
    terms = dict(adapter.terms) if adapter else {}
    keep = set(_check_keep_mxfp4(sources, terms)) if keep_mxfp4 else set()
    tensors: list[TensorPlan] = []
    seen: dict[str, str] = {}
    embeddings: list[tuple[str, TensorPlan]] = []

    def claim(gname: str, what: str) -> None:
        if gname in seen:
            raise InputError(f"tensors {seen[gname]!r} and {what!r} both map to GGUF tensor {gname!r}")
        seen[gname] = what

    for gname, values in (family.generated(config) if family.generated else {}).items():
        claim(gname, "(generated from config.json)")
        values = np.ascontiguousarray(values, dtype=np.float32)
        found = name_map.get_type_and_name(gname[: -len(".weight")] if gname.endswith(".weight") else gname)
        tensors.append(TensorPlan(OutTensor(gname, tuple(values.shape), gguf.GGMLQuantizationType.F32), (), (),
                                  values=values, op="generated", kind=found[0] if found else None))

    bound = _route_fused(family, sources, terms)
    stacked = _stack_groups(family, sources, config)
    done_stacks: set[tuple[str, Stack]] = set()
    other_modality: list[str] = []
    for name in _sorted_names(sources):
        why = family.skipped(name)
        if why is not None:
            _skip(family, name, sources[name], terms.pop(name, ()), why, other_modality)
            continue
        src = sources[name]
        group = stacked.get(name)
        if group is not None:
            key, members = group
            if key in done_stacks:
                continue
            done_stacks.add(key)
            prefix, stack = key
            inputs = tuple(Input(sources[m], tuple(Bound(t) for t in terms.pop(m, ())) + bound.pop(m, ()))
                           for m in members)
            gname, kind = gguf_name(family, name_map, prefix + stack.output)
            claim(gname, f"{members[0]} .. {members[-1]}")
            shape = (len(members), *src.shape)
            t = OutTensor(gname, shape, output_qtype(family, gname, kind, len(shape), outtype))
            parts = tuple(layout.Part(i, 0, layout.View()) for i in range(len(members)))
            tensors.append(TensorPlan(t, inputs, parts, block_rows=_block_rows(t, src, slab_bytes, False),
                                      op="Stack", kind=kind))
            continue
        found = family.rule_for(name)
        if found:
            prefix, rule = found
            op = rule.op
            hf_outs = [prefix + o for o in rule.outputs] if rule.outputs else [name]
        else:
            op, hf_outs = layout.Copy(), [name]
        outs = op.outputs(config, [src.shape])
        if len(outs) != len(hf_outs):
            raise UnsupportedError(f"{family.name}: the rule for {name!r} names {len(hf_outs)} outputs, its "
                                   f"operation makes {len(outs)}")
        inp = Input(src, tuple(Bound(t) for t in terms.pop(name, ())) + bound.pop(name, ()))
        packed = name in keep
        for hf_out, o in zip(hf_outs, outs):
            gname, kind = gguf_name(family, name_map, hf_out)
            claim(gname, name)
            qtype = output_qtype(family, gname, kind, len(o.shape), outtype)
            if packed:
                for part in o.parts:
                    layout.packed_rows(part.view)
                qtype = gguf.GGMLQuantizationType.MXFP4
            t = OutTensor(gname, tuple(o.shape), qtype)
            tensors.append(TensorPlan(t, (inp,), o.parts, o.add, packed=packed,
                                      block_rows=_block_rows(t, src, slab_bytes, packed), op=op.describe(),
                                      kind=kind))
            if kind in (gguf.MODEL_TENSOR.TOKEN_EMBD, gguf.MODEL_TENSOR.OUTPUT):
                embeddings.append((name, tensors[-1]))
    if terms:
        target = next(iter(terms))
        raise InputError(f"the adapter changes {target!r}, which the base checkpoint does not hold")
    config, resized = _resized_vocab(embeddings, config)
    _check_embeddings(embeddings, config)
    plan = Plan(family, config, outtype, tensors, adapter)
    if resized:
        plan.notes.append(resized)
    if other_modality:
        plan.notes.append(
            f"the adapter also changes {len(other_modality)} tensors of another modality (e.g. {other_modality[0]!r}); "
            "the GGUF holds the text model only (llama.cpp's converter writes a vision tower and its projector to "
            "a separate mmproj file), so those changes are not in it")
    if keep:
        n_out = sum(1 for t in tensors if t.packed)
        plan.notes.append(
            f"--keep-mxfp4: the MoE experts ({n_out} tensors) are written as MXFP4, repacked from the base "
            "without decoding (the adapter does not change them); general.file_type is MOSTLY_MXFP4_MOE")
    return plan


def _skip(family: Family, name: str, src: Source, terms: tuple, why: str, other_modality: list[str]) -> None:
    """A tensor the GGUF does not hold: fine unless the fine-tune changed it. Changes to another
    modality are noted (the text GGUF does not need them); a change to a text tensor that
    llama.cpp's architecture has no place for would be lost, so it is refused."""
    if not terms and src.origin != "adapter":
        return
    if why == "modality":
        other_modality.append(name)
        return
    raise UnsupportedError(
        f"the adapter changes {name!r}, which llama.cpp's {family.gguf_arch_name} architecture does not hold "
        "(its converter drops the tensor), so the GGUF would lose that part of the fine-tune. Retrain without "
        f"{name.rsplit('.', 1)[0].rsplit('.', 1)[-1]!r} in target_modules / modules_to_save")


def _resized_vocab(embeddings: list[tuple[str, TensorPlan]], config: Mapping) -> tuple[Mapping, str | None]:
    """A fine-tune that added tokens carries its embeddings with more rows (modules_to_save /
    save_embedding_layers): the GGUF's vocabulary is then that many rows, as the merged model's
    config.json would say (resize_token_embeddings updates vocab_size)."""
    rows = {tp.tensor.shape[0] for _, tp in embeddings if tp.inputs[0].source.origin == "adapter"
            and len(tp.tensor.shape) == 2}
    vocab = config.get("vocab_size")
    if len(rows) != 1 or vocab in rows:
        return config, None
    (n,) = rows
    names = ", ".join(sorted(name for name, tp in embeddings if tp.inputs[0].source.origin == "adapter"))
    return ({**config, "vocab_size": n},
            f"the adapter's full embedding weights ({names}) resize the vocabulary from {vocab} to {n} rows: "
            f"the GGUF has {n} tokens (vocab_size {n})")


def _check_embeddings(embeddings: list[tuple[str, TensorPlan]], config: Mapping) -> None:
    """The token embedding and the output matrix are (vocab_size, hidden_size): a config that
    says otherwise (edited, or from another model) would give a GGUF llama.cpp cannot load."""
    from .hparams import find

    hidden = find(config, ("hidden_size", "n_embd", "dim"), "config.json", required=False)
    vocab = config.get("vocab_size")
    for name, tp in embeddings:
        shape = tp.tensor.shape
        if len(shape) != 2:
            continue
        if hidden is not None and shape[1] != hidden:
            raise InputError(
                f"config.json: hidden_size is {hidden} (or absent and defaulted), but the checkpoint's {name!r} is "
                f"{list(shape)}: the config and the weights do not belong together. Use the config.json that came "
                "with these safetensors files.")
        if isinstance(vocab, int) and shape[0] != vocab:
            raise InputError(
                f"config.json: vocab_size is {vocab}, but the checkpoint's {name!r} has {shape[0]} rows (one per "
                "token): the config and the weights do not belong together. Use the config.json that came with "
                "these safetensors files.")


def shape_plan(family: Family, config: Mapping, shapes: Mapping[str, tuple[int, ...]],
               from_adapter: frozenset[str] | set[str] = frozenset()) -> Plan:
    """The plan for tensor shapes alone (doctor sizes and checks the GGUF from it before reading
    anything); ``from_adapter``: the tensors the adapter replaces with full weights."""
    stubs = {n: Source(n, tuple(s), "BF16", read=None, stored=(),  # type: ignore[arg-type]
                       origin="adapter" if n in from_adapter else "base") for n, s in shapes.items()}
    return make_plan(family, config, stubs, None, "bf16")


def merged_plan(plan: Plan, slab_bytes: int = DEFAULT_SLAB_BYTES) -> Plan:
    """--save-merged: the merged model in the Hugging Face layout, every tensor of the base in
    the output type, merged by the same arithmetic as the GGUF."""
    qtype = OUTTYPES[plan.outtype]
    tensors = []
    for s in plan.sources:
        inp = next(i for t in plan.tensors for i in t.inputs if i.source.name == s.name)
        t = OutTensor(s.name, tuple(s.shape), qtype)
        n = layout.matrix_count(s.shape)
        parts = tuple(layout.Part(0, e, layout.View()) for e in range(n))
        tensors.append(TensorPlan(t, (inp,), parts, block_rows=_block_rows(t, s, slab_bytes, False)))
    return replace(plan, tensors=tensors, notes=[])
