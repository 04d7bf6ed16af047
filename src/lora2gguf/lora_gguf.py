"""GGUF LoRA adapters: a PEFT adapter as the file llama.cpp applies on top of a base GGUF at load
time (``llama-cli -m base.gguf --lora adapter.gguf``, ``llama-server --lora``, Ollama's ``ADAPTER``).

Facts (llama.cpp's src/llama-adapter.cpp and src/llama-graph.cpp, as vendored by llama-cpp-python 0.3.36):
- keys: ``general.type = adapter``, ``adapter.type = lora``, ``adapter.lora.alpha`` (float32) and
  ``general.architecture``, which must be the base GGUF's ("model arch and LoRA arch mismatch").
- tensors: ``<base tensor>.lora_a`` and ``<base tensor>.lora_b`` for each adapted base tensor; a
  tensor the base does not hold stops the load, any other suffix too (``*_norm.weight`` is skipped).
- a matrix W of ggml shape [in, out] (numpy (out, in)) gets ``a`` [in, r] and ``b`` [r, out]: the
  output is ``W x + s * B (A x)`` (build_lora_mm); a 3-D expert tensor [in, out, E] gets ``a`` [in, r, E]
  and ``b`` [r, out, E], applied through ggml_mul_mat_id to the selected experts (build_lora_mm_id);
  the token embedding is looked up, not multiplied: its ``a`` is [r, n_vocab] and its ``b`` [r, n_embd]
  (build_inp_embd: "A and B are flipped").
- the scale is ``s = user_scale * alpha / r`` with ``r = b.ne[0]``, one alpha for the whole file.
- llama.cpp computes ``B (A x)`` in float32 whatever the stored type of A and B.

How the factors are made. The plan of the merged GGUF (plan.make_plan) says, for every GGUF tensor,
which source matrix each of its matrices is cut from and how (a layout.View: a transpose, a row
selection for the rotary q/k permute or the gate/up de-interleave, a column selection); the merge
adds ``left @ right = view.factors(...)`` for each LoRA term (stream.block_factors). The adapter file
holds exactly those factors: ``lora_b = left`` and ``lora_a = right`` (the token embedding:
``lora_a = left``, ``lora_b = right^T``), several terms of one tensor side by side along the rank, the
experts of a 3-D tensor stacked on the outer axis (zero-padded to the largest rank). PEFT's scale is
folded into B as the merge folds it, times ``K / alpha`` (K the rank in the file): llama.cpp's
``alpha / K`` then gives PEFT's delta for every tensor, whatever rsLoRA, ``rank_pattern`` or
``alpha_pattern`` made of its scale. For plain LoRA the factor is exactly 1 and B is stored as saved.
Each factor is computed in float64 and rounded once to the output type (numerics.round_f64); Q8_0
is gguf-py's quantizer on the float32 values, as llama.cpp's converter does it (a row that is not a
whole number of 32-value blocks, e.g. B's rank axis, falls back to F16, as there).

What llama.cpp cannot apply at load time is named (:data:`LEFT_OUT`) and stops the export unless
the user accepts its code: then it is left out and recorded.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field, replace
from fractions import Fraction
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import gguf
import numpy as np

from . import lora, numerics
from .adapter import Adapter, LoraTerm
from .arch import Family
from .errors import BlockedError, FormatError, InputError, NumericError, UnsupportedError
from .plan import OutTensor, TensorPlan, make_plan
from .sources import Source

Q = gguf.GGMLQuantizationType
OUTTYPES: dict[str, gguf.GGMLQuantizationType] = {"f32": Q.F32, "f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0}
_ROUND = {Q.F32: "f32", Q.F16: "f16", Q.BF16: "bf16"}

# progress(done, total, what)
Progress = Callable[[int, int, str], None]

#: what llama.cpp cannot apply at load time, by the code ``--accept`` takes: why, and what to do
LEFT_OUT: dict[str, str] = {
    "LORA_FULL_WEIGHTS": "the adapter replaces these base tensors with full trained weights (modules_to_save or "
                         "save_embedding_layers); a runtime LoRA can only add B @ A to a tensor of the base GGUF",
    "LORA_TOKEN_ROWS": "the adapter replaces these embedding rows with trained values (trainable_token_indices); a "
                       "runtime LoRA can only add B @ A",
    "LORA_DORA": "DoRA rescales every output row by a trained magnitude after adding the LoRA delta; llama.cpp "
                 "applies plain LoRA only",
    "LORA_BIAS": "the adapter trains bias terms (lora_bias); llama.cpp applies LoRA to weight matrices only",
    "LORA_NOT_APPLIED": "llama.cpp applies LoRA to 2-D and 3-D weight matrices only, not to norms, biases or "
                        "attention sinks",
    "LORA_TIED_EMBEDDING": "the base ties its output matrix to the token embedding: llama.cpp applies the "
                           "embedding's LoRA (its factors laid out for a lookup) to the output matrix too, and aborts "
                           "the process (GGML_ASSERT ggml_can_mul_mat in build_lora_mm)",
}


@dataclass(frozen=True)
class LeftOut:
    """A part of the adapter llama.cpp cannot apply at runtime."""

    code: str
    what: str  # the adapter's tensors or setting

    @property
    def why(self) -> str:
        return LEFT_OUT[self.code]

    def to_dict(self, accepted: bool) -> dict[str, Any]:
        return {"code": self.code, "what": self.what, "why": self.why, "accepted": accepted}


@dataclass(frozen=True)
class Term:
    """One LoRA term of a file tensor: its adapter key, PEFT's rank, alpha and scale, and the
    factor its B is multiplied by in the file (so that llama.cpp's alpha/rank gives PEFT's scale)."""

    key: str
    rank: int
    alpha: float
    scale: float
    fold: float

    def to_dict(self) -> dict[str, Any]:
        return {"key": self.key, "r": self.rank, "alpha": self.alpha, "scale": self.scale, "fold": self.fold}


@dataclass(frozen=True)
class LoraTensor:
    """One adapted GGUF tensor: the base tensor's name and shape (numpy order), and its lora_a/lora_b."""

    target: str
    base_shape: tuple[int, ...]
    rank: int  # K: the rank llama.cpp sees (b.ne[0])
    a: OutTensor
    b: OutTensor
    plan: TensorPlan
    terms: tuple[Term, ...]
    embedding: bool = False  # the token embedding: a and b flipped (llama.cpp's get_rows route)

    def to_dict(self) -> dict[str, Any]:
        return {"rank": self.rank, "a": [list(self.a.shape), self.a.qtype.name],
                "b": [list(self.b.shape), self.b.qtype.name], "op": self.plan.op,
                "terms": [t.to_dict() for t in self.terms]}


@dataclass
class LoraPlan:
    family: Family
    config: Mapping[str, Any]
    adapter: Adapter
    outtype: str
    alpha: float  # adapter.lora.alpha as llama.cpp reads it (a float32)
    tensors: list[LoraTensor]
    left_out: list[LeftOut] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def outputs(self) -> list[OutTensor]:
        return [x for t in self.tensors for x in (t.a, t.b)]

    @property
    def type_name(self) -> str:
        return f"LoRA-{self.outtype.upper()}"

    def blocking(self, accept: Sequence[str] = ()) -> list[LeftOut]:
        accepted = {a.upper() for a in accept}
        return [x for x in self.left_out if x.code not in accepted]

    def check_accepted(self, accept: Sequence[str] = ()) -> None:
        """BlockedError naming every part llama.cpp cannot apply whose code is not accepted."""
        bad = self.blocking(accept)
        if not bad:
            return
        lines = "\n".join(f"  [{x.code}] {x.what}\n      {x.why}" for x in bad)
        codes = " ".join(f"--accept {c}" for c in dict.fromkeys(x.code for x in bad))
        raise BlockedError(
            f"{self.adapter.folder}: llama.cpp cannot apply these parts of the adapter at load time; nothing was "
            f"written:\n{lines}\nShip the merged GGUF for this fine-tune (`lora2gguf build`), or leave them out of "
            f"the adapter file with {codes} (the file then differs from the fine-tune; verify measures by how much).")

    def record(self, accept: Sequence[str] = ()) -> dict[str, Any]:
        accepted = {a.upper() for a in accept}
        cfg = self.adapter.config
        return {
            "alpha": self.alpha, "outtype": self.outtype, "arch": self.family.gguf_arch_name,
            "peft": {"r": cfg.get("r"), "lora_alpha": cfg.get("lora_alpha"), "use_rslora": self.adapter.use_rslora,
                     "rank_pattern": cfg.get("rank_pattern") or {}, "alpha_pattern": cfg.get("alpha_pattern") or {}},
            "scaling": "llama.cpp applies alpha / rank per tensor (rank = the file tensor's); each term's B holds "
                       "PEFT's scale times rank / alpha (the fold), so the applied delta is PEFT's",
            "tensors": {t.target: t.to_dict() for t in self.tensors},
            "left_out": [x.to_dict(x.code in accepted) for x in self.left_out],
            "notes": list(self.notes),
        }


# --------------------------------------------------------------------------- scaling


def file_alpha(adapter: Adapter) -> float:
    """The file's adapter.lora.alpha: the adapter's lora_alpha as the float32 llama.cpp reads."""
    return float(np.float32(adapter.config["lora_alpha"]))


def fold(term: LoraTerm, rank: int, alpha: float, use_rslora: bool) -> float:
    """The factor a term's B is multiplied by in the file: PEFT's scale ``s`` times ``rank / alpha``,
    so that llama.cpp's ``alpha / rank`` gives back ``s``. Computed from the term's alpha and rank as
    exact fractions where PEFT's scale is alpha/r or alpha/sqrt(r) of a square r (plain LoRA with
    one term gives exactly 1), else from the float64 scale."""
    ratio = Fraction(rank) / Fraction(alpha)
    try:
        expected = lora.scaling(term.alpha, term.rank, use_rslora)
    except ValueError:
        expected = None
    if expected is not None and expected == term.scale:
        a = Fraction(term.alpha)
        if not use_rslora:
            return float(a / term.rank * ratio)
        root = math.isqrt(term.rank)
        if root * root == term.rank:
            return float(a / root * ratio)
        return float(a * ratio) / math.sqrt(term.rank)
    return float(Fraction(term.scale) * ratio)


# --------------------------------------------------------------------------- the plan


def _applies(tp: TensorPlan) -> bool:
    """Whether llama.cpp applies a LoRA to this GGUF tensor: 2-D and 3-D weight matrices (its
    loader skips ``*_norm.weight``, and biases, sinks and other vectors have no matmul to join)."""
    name = tp.tensor.name
    return (tp.values is None and len(tp.tensor.shape) in (2, 3) and name.endswith(".weight")
            and not name.endswith("_norm.weight"))


def _qtype(outtype: str, shape: tuple[int, ...], name: str, fallback: list[str]) -> gguf.GGMLQuantizationType:
    qt = OUTTYPES[outtype]
    if qt == Q.Q8_0 and shape[-1] % gguf.GGML_QUANT_SIZES[Q.Q8_0][0]:
        fallback.append(name)
        return Q.F16
    return qt


def _keys(terms: Sequence[LoraTerm]) -> str:
    return ", ".join(sorted({t.key for t in terms}))


def same_as_base(info, source: Source, rows_per_slab: int = 4096) -> bool:
    """Whether a full weight the adapter saved holds exactly the base tensor's values. PEFT saves the
    embedding and lm_head whole when a LoRA targets them (save_embedding_layers="auto"), unchanged:
    such a copy changes nothing and needs nothing at runtime. Read a slab of rows at a time."""
    from .safetensors_io import map_raw, to_f32

    if tuple(info.shape) != tuple(source.shape) or not info.shape:
        return False
    n = info.shape[0]
    for r0 in range(0, n, rows_per_slab):
        rows = slice(r0, min(n, r0 + rows_per_slab))
        mine = to_f32(map_raw(info, rows=rows), info.dtype, name=info.name)
        if not np.array_equal(mine, source.read(rows)):
            return False
    return True


def plan_lora(family: Family, config: Mapping[str, Any], sources: Mapping[str, Source], adapter: Adapter,
              outtype: str = "f16") -> LoraPlan:
    """The adapter file for the base's sources (as logical_tensors gives them; the adapter's full
    weights not applied) and the adapter's terms: each lora_a/lora_b's name, shape and type, and the
    parts llama.cpp cannot apply. Reads no tensor data, except where the adapter saved a full weight
    of the base's shape: that is compared with the base's (:func:`same_as_base`)."""
    outtype = outtype.lower()
    if outtype not in OUTTYPES:
        raise InputError(f"--outtype {outtype!r}: a LoRA GGUF is one of {', '.join(OUTTYPES)}")
    left: list[LeftOut] = []
    notes: list[str] = []
    for target, info in sorted(adapter.replaced.items()):
        base = sources.get(target)
        if base is not None and tuple(base.shape) != tuple(info.shape):
            raise UnsupportedError(
                f"{adapter.folder}: the adapter's {info.name} {list(info.shape)} replaces {target} "
                f"{list(base.shape)}: the fine-tune resized the vocabulary, and a runtime LoRA cannot add token rows to "
                "a base GGUF. Ship the merged GGUF for this fine-tune (`lora2gguf build`).")
        if base is not None and same_as_base(info, base):
            notes.append(f"{info.name}: a full copy of the base's {target}, bit for bit (PEFT saves targeted embedding "
                         "layers whole): nothing to apply")
            continue
        left.append(LeftOut("LORA_FULL_WEIGHTS", f"{target} (saved as {info.name})"))
    for target, rows in sorted(adapter.token_rows.items()):
        left.append(LeftOut("LORA_TOKEN_ROWS", f"{target}: rows {list(rows.indices)[:8]}"
                                               + (" ..." if len(rows.indices) > 8 else "")))
    cfg = adapter.config
    dora = sorted({t.key for t in adapter.all_terms if t.magnitude is not None})
    if dora or cfg.get("use_dora"):
        left.append(LeftOut("LORA_DORA", f"use_dora: the magnitude vectors of {len(dora)} module(s)"
                                         + (f" (e.g. {dora[0]})" if dora else "")))
    if cfg.get("lora_bias") or adapter.lora_biases:
        biases = sorted(adapter.lora_biases)
        left.append(LeftOut("LORA_BIAS", f"lora_bias: the lora_B biases of {len(biases)} module(s)"
                                         + (f" ({', '.join(biases[:3])}{' ...' if len(biases) > 3 else ''})"
                                            if biases else "")))

    plan = make_plan(family, config, sources, adapter, "bf16")
    tied = not any(t.kind == gguf.MODEL_TENSOR.OUTPUT for t in plan.tensors)
    alpha = file_alpha(adapter)
    if alpha <= 0 or not math.isfinite(alpha):
        raise InputError(f"{adapter.folder}: lora_alpha {cfg.get('lora_alpha')!r} is not a positive float32")
    tensors: list[LoraTensor] = []
    f16: list[str] = []  # Q8_0 asked, rows not whole blocks
    for tp in plan.tensors:
        if not tp.touched:
            continue
        terms = [b.term for i in tp.inputs for b in i.terms]  # plan.Bound: a term as one source sees it
        if not _applies(tp):
            left.append(LeftOut("LORA_NOT_APPLIED", f"{tp.tensor.name} {list(tp.tensor.shape)} ({_keys(terms)})"))
            continue
        embedding = tp.kind == gguf.MODEL_TENSOR.TOKEN_EMBD
        if embedding and tied:
            left.append(LeftOut("LORA_TIED_EMBEDDING", f"{tp.tensor.name} ({_keys(terms)})"))
            continue
        rank = max(sum(b.term.rank for b in tp.inputs[p.input].terms) for p in tp.parts)
        shape = tp.tensor.shape
        rows, cols = shape[-2], shape[-1]
        if embedding:
            a_shape, b_shape = (rows, rank), (cols, rank)
        elif len(shape) == 3:
            a_shape, b_shape = (shape[0], rank, cols), (shape[0], rows, rank)
        else:
            a_shape, b_shape = (rank, cols), (rows, rank)
        a = OutTensor(tp.tensor.name + ".lora_a", a_shape, _qtype(outtype, a_shape, tp.tensor.name + ".lora_a", f16))
        b = OutTensor(tp.tensor.name + ".lora_b", b_shape, _qtype(outtype, b_shape, tp.tensor.name + ".lora_b", f16))
        seen: dict[str, Term] = {}
        for t in terms:
            seen.setdefault(t.key, Term(t.key, t.rank, t.alpha, t.scale, fold(t, rank, alpha, adapter.use_rslora)))
        tensors.append(LoraTensor(tp.tensor.name, tuple(shape), rank, a, b, tp, tuple(seen.values()), embedding))
    if f16:
        notes.append(f"{len(f16)} tensor(s) (e.g. {f16[0]}) have rows that are not whole Q8_0 blocks of 32 (the rank "
                     "axis of lora_b): F16, as llama.cpp's converter falls back")
    if not tensors and not left:
        raise InputError(f"{adapter.folder}: the adapter changes no tensor of the base")
    return LoraPlan(family, plan.config, adapter, outtype, alpha, tensors, left, [*plan.notes, *notes])


# --------------------------------------------------------------------------- the factors


def tensor_factors(lt: LoraTensor, alpha: float, use_rslora: bool, cache: dict | None = None
                   ) -> tuple[np.ndarray, np.ndarray]:
    """(lora_a, lora_b) of one file tensor, float64 in numpy order: every output matrix's factors
    as the merge cuts them (stream.block_factors over the plan's parts and views, each input's
    terms as that source sees them: plan.Bound), each term's scale replaced by its fold,
    zero-padded to the tensor's rank. DoRA magnitudes are not applied (left out, LORA_DORA)."""
    from .stream import block_factors, read_factors

    cache = {} if cache is None else cache
    tp = lt.plan
    a = np.zeros(lt.a.shape, np.float64)
    b = np.zeros(lt.b.shape, np.float64)
    a3 = a if a.ndim == 3 else a[None]
    b3 = b if b.ndim == 3 else b[None]
    for i, part in enumerate(tp.parts):
        inp = tp.inputs[part.input]
        factors = []
        for bound in inp.terms:
            t = bound.term
            key = (t.key, t.target, bound.matrix, bound.view, lt.rank)
            if key not in cache:
                folded = replace(t, scale=fold(t, lt.rank, alpha, use_rslora), magnitude=None)
                cache[key] = read_factors(replace(bound, term=folded))
            factors.append(cache[key])
        got = block_factors(factors, part.matrix, part.view)
        if got is None:
            continue
        left, right = got  # left @ right: the output matrix's delta, (rows, k) and (k, cols)
        k = left.shape[1]
        if lt.embedding:  # looked up by token: a (vocab, K) = left, b (dim, K) = right^T
            a3[i, :, :k] = left
            b3[i, :, :k] = right.T
        else:
            b3[i, :, :k] = left
            a3[i, :k, :] = right
    return a, b


def encode(x: np.ndarray, t: OutTensor, key: str) -> np.ndarray:
    """float64 factor values rounded once to the tensor's type (Q8_0: gguf-py's quantizer on the
    float32 values); NumericError where a value does not fit."""
    f32 = numerics.round_f64(x, "f32")
    if not np.isfinite(f32).all():
        raise NumericError(f"{t.name}: the LoRA factors of {key} hold NaN or Inf (or values beyond float32); the "
                           "adapter was saved from a diverged training run: use an earlier checkpoint")
    if t.qtype == Q.Q8_0:
        return gguf.quants.quantize(f32, Q.Q8_0)
    out = numerics.round_f64(x, _ROUND[t.qtype])
    if t.qtype != Q.F32:
        if not numerics.half_bits_finite(out, _ROUND[t.qtype]):
            raise NumericError(f"{t.name}: a LoRA factor of {key} is beyond the range of {t.qtype.name} (largest "
                               f"|value| {float(np.abs(x).max()):.4g}); write the adapter with --outtype f32 or bf16")
    return out


@dataclass
class Written:
    path: Path
    sha256: str
    bytes: int
    seconds: float
    tensor_types: dict[str, str]


def write_lora(lplan: LoraPlan, path: str | os.PathLike[str], *, name: str, progress: Progress | None = None
               ) -> Written:
    """Write the adapter GGUF atomically (a temporary name, renamed when complete and readable)."""
    from .gguf_out import GGUFStream

    t0 = time.perf_counter()
    path = Path(path)
    if not lplan.tensors:
        raise InputError(f"{lplan.adapter.folder}: nothing of the adapter is left for llama.cpp to apply "
                         "(every part was left out); there is no adapter file to write")

    def add_metadata(w: gguf.GGUFWriter) -> None:
        w.add_type(gguf.GGUFType.ADAPTER)
        w.add_string(gguf.Keys.Adapter.TYPE, "lora")
        w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, lplan.alpha)
        w.add_name(name)
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)

    out = GGUFStream(path, lplan.family.gguf_arch_name, add_metadata, lplan.outputs)
    cache: dict = {}
    try:
        for i, lt in enumerate(lplan.tensors):
            a, b = tensor_factors(lt, lplan.alpha, lplan.adapter.use_rslora, cache)
            files = sorted({str(b.term.a.path) for i in lt.plan.inputs for b in i.terms})
            keys = ", ".join(t.key for t in lt.terms) + f" (in {', '.join(files)})"
            out.write(lt.a.name, encode(a, lt.a, keys))
            out.write(lt.b.name, encode(b, lt.b, keys))
            if progress:
                progress(i + 1, len(lplan.tensors), lt.target)
        out.finish()
    except BaseException:
        out.abort()
        raise
    return Written(path, out.sha256 or "", path.stat().st_size, time.perf_counter() - t0,
                   {t.name: t.qtype.name for t in lplan.outputs})


# --------------------------------------------------------------------------- pairing with a base GGUF


def file_type_name(value: object) -> str:
    """general.file_type as the short type name a user knows (MOSTLY_Q8_0 -> Q8_0)."""
    try:
        name = gguf.LlamaFileType(int(value)).name  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return "?"
    for prefix in ("MOSTLY_", "ALL_"):
        if name.startswith(prefix):
            return name[len(prefix):]
    return name


@dataclass(frozen=True)
class BaseFile:
    """A base GGUF an adapter was checked against."""

    path: Path
    type: str
    bytes: int
    sha256: str | None
    #: how the SHA-256 was had: "written" (this run wrote the file), "fingerprint" (recorded by an
    #: earlier run, the file unchanged since), "sha256" (hashed in full); None: not hashed
    confirmed: str | None = None

    def to_dict(self, out_dir: Path | None = None) -> dict[str, Any]:
        inside = out_dir is not None and self.path.parent.resolve() == Path(out_dir).resolve()
        return {"file": self.path.name, "path": None if inside else str(self.path.resolve()), "type": self.type,
                "bytes": self.bytes, "sha256": self.sha256}


def check_base(lplan: LoraPlan, path: str | os.PathLike[str], *, sha256: str | None = None,
               hash_file: bool = True) -> BaseFile:
    """The base GGUF ``path`` carries every tensor the adapter changes, in the shape it was made
    for, and the adapter's architecture (llama.cpp would refuse the pair, or apply it to other
    weights); InputError naming the file and the tensor otherwise. Reads the header only, and the
    whole file for its SHA-256 unless ``sha256`` is given."""
    from .gguf_header import read_header
    from .gguf_out import sha256_file

    p = Path(path)
    if not p.is_file():
        raise InputError(f"--base-gguf {p}: no such file")
    try:
        h = read_header(p)
    except FormatError as e:
        raise InputError(f"--base-gguf {p}: not a readable GGUF ({e})") from None
    arch, kind = h.values.get(gguf.Keys.General.ARCHITECTURE), h.values.get(gguf.Keys.General.TYPE)
    if kind == "adapter":
        raise InputError(f"--base-gguf {p}: this is an adapter GGUF (general.type = adapter), not a base model")
    want = lplan.family.gguf_arch_name
    if arch != want:
        raise InputError(
            f"--base-gguf {p}: its architecture is {arch!r}, but the adapter is for a {lplan.family.name} base "
            f"(GGUF architecture {want!r}); llama.cpp refuses the pair. Use a GGUF of the adapter's base model "
            "(`lora2gguf build BASE_DIR ADAPTER_DIR --lora-gguf` writes one).")
    missing = [lt for lt in lplan.tensors if lt.target not in h.tensors]
    wrong = [lt for lt in lplan.tensors
             if lt.target in h.tensors and tuple(h.tensors[lt.target].shape) != tuple(reversed(lt.base_shape))]
    if wrong:
        lt = wrong[0]
        more = f" (and {len(wrong) - 1} more tensors)" if len(wrong) > 1 else ""
        raise InputError(f"--base-gguf {p}: tensor {lt.target!r} is {list(h.tensors[lt.target].shape)} (ggml order) "
                         f"there, but the adapter was made for {list(reversed(lt.base_shape))}{more}: a GGUF of another "
                         "model or size. Use a GGUF of the adapter's base model.")
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise InputError(f"--base-gguf {p}: holds no tensor {missing[0].target!r}{more}, which the adapter changes: "
                         "it is a GGUF of another model. Use a GGUF of the adapter's base model.")
    sha = sha256 if sha256 is not None else (sha256_file(p) if hash_file else None)
    return BaseFile(p, file_type_name(h.values.get(gguf.Keys.General.FILE_TYPE)), p.stat().st_size, sha)
