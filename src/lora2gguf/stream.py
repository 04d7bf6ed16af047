"""Execute a plan: every GGUF tensor made block by block, merged and rounded once, written in
file order.

A unit of work is a block of output rows of one output matrix (one expert of a 3-D tensor, or a
run of rows of a 2-D one). Worker threads compute units (numpy, BLAS and the reads release the
GIL); this thread writes their results in file order, so the GGUF streams sequentially
(seqwrite). Memory is bounded by a few units per worker plus the LoRA factors of the tensor at
hand; the merged model is never held in memory.

One route computes every unit:
- a tensor the adapter leaves alone is the source's stored bits through its layout view when
  the output keeps the stored type (bit for bit, no float32 round trip), else the source's
  values through the view, rounded once to the output type;
- a tensor the adapter changes goes through merge.merge_block: the base tile gathered through
  the view (a transposing gather in cache-sized blocks for expert layouts), the LoRA factors
  cut by the same view (layout.View.factors), the delta added in float64 and rounded once by
  the rule that makes the bytes independent of the machine (merge.RULE).
"""

from __future__ import annotations

import json
import math
import os
import threading
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, NamedTuple, Protocol

import gguf
import numpy as np
from threadpoolctl import threadpool_limits

from . import layout, lora, merge, numerics
from .adapter import LoraTerm
from .errors import InputError, NumericError, OutputError
from .plan import OUTTYPES, Plan, TensorPlan
from .safetensors_io import StreamingWriter, TensorSpec, read_raw, to_f32

# progress(done_bytes, total_bytes, what)
Progress = Callable[[int, int, str], None]

_DTYPE = {gguf.GGMLQuantizationType.BF16: "bf16", gguf.GGMLQuantizationType.F16: "f16",
          gguf.GGMLQuantizationType.F32: "f32"}
_SAME_TYPE = {"BF16": gguf.GGMLQuantizationType.BF16, "F16": gguf.GGMLQuantizationType.F16,
              "F32": gguf.GGMLQuantizationType.F32}


class Sink(Protocol):
    def write(self, name: str, data: np.ndarray, byte_offset: int = 0, *, borrow: bool = False) -> None:
        """``borrow``: ``data`` is never changed afterwards (the sink may keep it instead of a copy)."""

    def abort(self) -> None: ...


def encode(x: np.ndarray, qtype: gguf.GGMLQuantizationType, name: str) -> np.ndarray:
    """float32 values (exact source values) rounded once to the output type."""
    if qtype == gguf.GGMLQuantizationType.F32:
        return np.ascontiguousarray(x, dtype=np.float32)
    if qtype == gguf.GGMLQuantizationType.F16:
        with np.errstate(over="ignore"):
            return x.astype(np.float16)
    if qtype == gguf.GGMLQuantizationType.BF16:
        return numerics.f32_to_bf16_bits(x, name=name)
    raise ValueError(f"{name}: cannot encode {qtype.name} while streaming")


# --------------------------------------------------------------------------- LoRA factors


@dataclass(frozen=True)
class Factors:
    """A LoRA pair read once per tensor, float64 (exact widenings of the stored values), and how
    the source sees its delta (plan.Bound)."""

    term: LoraTerm
    a: np.ndarray
    b: np.ndarray
    matrix: int | None = None
    view: layout.View = layout.View()
    magnitude: np.ndarray | None = None  # DoRA: one value per output row of the source


def read_factors(bound) -> Factors:
    """The factors of a plan.Bound (or a bare LoraTerm)."""
    term = getattr(bound, "term", bound)
    a = to_f32(read_raw(term.a), term.a.dtype, name=term.a.name).astype(np.float64)
    b = to_f32(read_raw(term.b), term.b.dtype, name=term.b.name).astype(np.float64)
    mag = None
    if term.magnitude is not None:
        mag = to_f32(read_raw(term.magnitude), term.magnitude.dtype, name=term.magnitude.name).astype(np.float64)
    return Factors(term, a, b, getattr(bound, "matrix", None), getattr(bound, "view", layout.View()), mag)


def row_scale(factors: list[Factors], view: layout.View, name: str) -> np.ndarray | None:
    """DoRA's magnitudes in the output matrix's row order (the view's row selection), or None."""
    mags = [f.magnitude for f in factors if f.magnitude is not None]
    if not mags:
        return None
    if len(mags) > 1 or view.transpose or view.cols != layout.ALL:
        raise NumericError(f"{name}: DoRA with this layout (several DoRA terms, or a transposed / column-cut "
                           "tensor) cannot be merged row by row; merge with PEFT and convert the merged model")
    return np.ascontiguousarray(mags[0][layout.index_array(view.rows)])


def source_factors(f: Factors, matrix: int) -> tuple[np.ndarray, np.ndarray]:
    """(left, right) with left @ right = the term's delta of source matrix ``matrix`` in the
    source's own orientation (lora.py: the scale folded into B); a term bound to one expert of a
    fused parameter gives that expert's delta, cut to the source's rows of it."""
    t = f.term
    if t.kind in ("linear", "embedding"):  # an embedding's delta (B @ A)^T is the fan_in_fan_out form
        left, right = lora.linear_factors(f.a, f.b, t.scale, fan_in_fan_out=t.fan_in_fan_out)
    else:
        e = matrix if f.matrix is None else f.matrix
        left, right = lora.expert_matrix_factors(f.a, f.b, t.scale, t.num_experts, e, t.layout)
    return (left, right) if f.view.is_identity else f.view.factors(left, right)


def block_factors(factors: list[Factors], matrix: int, view: layout.View) -> tuple[np.ndarray, np.ndarray] | None:
    """Every term's factors for one output matrix, cut by its view and stacked along the rank:
    left (rows, K), right (K, cols). None without terms."""
    if not factors:
        return None
    lefts, rights = [], []
    for f in factors:
        left, right = view.factors(*source_factors(f, matrix))
        lefts.append(left)
        rights.append(right)
    return np.ascontiguousarray(np.concatenate(lefts, axis=1)), np.ascontiguousarray(np.concatenate(rights, axis=0))


# --------------------------------------------------------------------------- source regions


def source_region(tp: TensorPlan, matrix: int, view: layout.View, *, stored: bool) -> tuple[np.ndarray, layout.View]:
    """The smallest region of the source that ``view`` reads (stored bits or float32 values),
    and the view relative to that region."""
    part = tp.parts[matrix]
    src = tp.inputs[part.input].source
    read = src.read_stored if stored else src.read
    nd = len(src.shape)
    if nd == 3:
        return read(slice(part.matrix, part.matrix + 1))[0], view
    if nd == 1:
        return read(None).reshape(-1, 1), view
    first, last = view.row_span(layout.matrix_shape(src.shape))
    if view.transpose or (first == 0 and last == src.shape[0]):
        return read(None) if view.transpose else read(slice(0, src.shape[0])), view
    return read(slice(first, last)), view.shifted(first)


class _Scratch(threading.local):
    """Per-thread buffers of the merge (the transposing gather's among them)."""

    def __init__(self):
        self.work = merge.Work()


def _gather(region: np.ndarray, view: layout.View) -> merge.Gather:
    """merge_block's base values: ``view`` over ``region`` (stored bf16 bits or float32 values),
    read in place. A view that cuts columns by a list of indices is gathered here."""
    x = region
    if view.cols != layout.ALL and not isinstance(view.cols, layout.Span):
        x = np.ascontiguousarray((x.T if view.transpose else x)[:, layout.index_array(view.cols)])
        view = layout.View(False, view.rows)
    n_rows = x.shape[1] if view.transpose else x.shape[0]
    rows = np.arange(n_rows, dtype=np.int64)[layout.index_array(view.rows)]
    cols = view.cols.slice if isinstance(view.cols, layout.Span) else slice(None)
    return merge.Gather(x, view.transpose, rows, cols)


# --------------------------------------------------------------------------- units


def _where(rows: slice, matrix: int, tp: TensorPlan) -> str:
    e = f" expert {matrix}" if len(tp.parts) > 1 else ""
    return f"{e} (rows {rows.start}..{rows.stop - 1})"


def _check_stored_finite(raw: np.ndarray, name: str, where: str) -> None:
    if raw.dtype == np.uint16:  # bf16 bits
        bad = not numerics.half_bits_finite(raw, "bf16")
    elif raw.dtype == np.float16:
        bad = not numerics.half_bits_finite(raw.view(np.uint16), "f16")
    else:
        bad = raw.size and not np.isfinite(raw).all()
    if bad:
        raise NumericError(f"base tensor {name!r}{where} already holds NaN or Inf: the base checkpoint is damaged")


def _explain_nonfinite(tp: TensorPlan, matrix: int, rows: slice, factors: list[Factors]) -> NumericError:
    inp = tp.inputs[tp.parts[matrix].input]
    src = inp.source
    where = _where(rows, matrix, tp)
    view = tp.parts[matrix].view.source_rows(layout.matrix_shape(src.shape), rows)
    region, v = source_region(tp, matrix, view, stored=False)
    if not np.isfinite(v.apply(region)).all():
        return NumericError(f"base tensor {src.name!r}{where} already holds NaN or Inf: the base checkpoint is damaged")
    for f in factors:
        if not (np.isfinite(f.a).all() and np.isfinite(f.b).all()):
            t = f.term
            return NumericError(
                f"merged tensor {src.name!r}{where} has NaN/Inf: the LoRA pair {t.key} (lora_A/lora_B) in "
                f"{t.a.path} holds NaN or Inf values ({t.a.name} / {t.b.name}). The adapter was saved from a "
                "diverged training run; use an earlier checkpoint.")
    keys = ", ".join(f.term.key for f in factors) or "none"
    files = ", ".join(sorted({str(f.term.a.path) for f in factors})) or "the adapter"
    return NumericError(
        f"merged tensor {src.name!r}{where} overflows to NaN/Inf after adding the LoRA pair(s) {keys} "
        f"from {files}; check the adapter's scaling (lora_alpha, r, use_rslora)")


def _keeps_stored(src, qtype) -> bool:
    """The output is the source's stored bits (through a view): same type, bits readable."""
    return _SAME_TYPE.get(src.storage) == qtype and src.read_stored is not None


def stored_copy(tp: TensorPlan) -> bool:
    """Every unit of ``tp`` is stored bits moved through a view: no arithmetic, no buffer."""
    return (not tp.touched and not tp.add and tp.values is None and not tp.packed
            and all(_keeps_stored(i.source, tp.tensor.qtype) for i in tp.inputs))


def compute_unit(tp: TensorPlan, matrix: int, rows: slice, factors: list[list[Factors]], scratch: _Scratch,
                 take: Callable[[tuple[int, ...], np.dtype], np.ndarray]) -> np.ndarray:
    """The output bytes of one unit: rows ``rows`` of output matrix ``matrix`` of ``tp``
    (``factors``: per input of ``tp``, its LoRA factors)."""
    t = tp.tensor
    if tp.values is not None:
        return tp.values
    part = tp.parts[matrix]
    factors = factors[part.input] if factors else []
    src = tp.inputs[part.input].source
    mshape = layout.matrix_shape(src.shape)
    view = part.view.source_rows(mshape, rows)
    out_cols = view.shape(mshape)[1]
    n = rows.stop - rows.start
    if tp.packed:  # --keep-mxfp4: ggml MXFP4 blocks, bits moved, nothing decoded
        blocks = src.read_packed(slice(part.matrix, part.matrix + 1))[0]
        return np.ascontiguousarray(blocks[layout.index_array(layout.packed_rows(view))])
    if not factors and not tp.add:
        if _keeps_stored(src, t.qtype):
            region, v = source_region(tp, matrix, view, stored=True)
            raw = v.apply(region)
            _check_stored_finite(raw, src.name, _where(rows, matrix, tp))
            return raw.reshape(_piece_shape(t, n, out_cols))
        region, v = source_region(tp, matrix, view, stored=False)
        vals = v.apply(region)
        if not np.isfinite(vals).all():
            raise NumericError(f"base tensor {src.name!r}{_where(rows, matrix, tp)} already holds NaN or Inf: "
                               "the base checkpoint is damaged")
        return encode(vals, t.qtype, t.name).reshape(_piece_shape(t, n, out_cols))
    stored = src.storage == "BF16" and src.read_stored is not None
    region, v = source_region(tp, matrix, view, stored=stored)
    lr = block_factors(factors, part.matrix, part.view)  # the whole matrix's factors; this block's rows
    left, right = (np.ascontiguousarray(lr[0][rows]), lr[1]) if lr is not None else (None, None)
    dtype = _DTYPE[t.qtype]
    out = take((n, out_cols), np.float32 if dtype == "f32" else np.uint16)
    gather = _gather(region, v)
    scale = row_scale(factors, part.view, src.name)
    if not merge.merge_block(gather, (n, out_cols), left, right, dtype, out=out, add=tp.add, work=scratch.work,
                             row_scale=None if scale is None else scale[rows]):
        if scale is not None:
            raise NumericError(f"merged tensor {src.name!r}{_where(rows, matrix, tp)}: a row of W + delta has norm 0 "
                               "or NaN/Inf, so DoRA's magnitude / norm is not a number; check the adapter")
        raise _explain_nonfinite(tp, matrix, rows, factors)
    return out.reshape(_piece_shape(t, n, out_cols))


def _piece_shape(t, n: int, cols: int) -> tuple[int, ...]:
    return (n,) if len(t.shape) == 1 else (n, cols)


class _Buffers:
    """Output buffers of merged units, given back once written: a fresh 16 MB array per unit
    would cost page faults and zeroing of every byte (measured: 5% of a build's CPU)."""

    def __init__(self):
        self._free: dict[tuple[int, str], list[np.ndarray]] = {}
        self._lock = threading.Lock()
        self.mine: set[int] = set()

    def take(self, shape: tuple[int, ...], dtype) -> np.ndarray:
        n = math.prod(shape)
        dt = np.dtype(dtype)
        with self._lock:
            free = self._free.get((n, dt.str))
            buf = free.pop() if free else None
            if buf is None:
                buf = np.empty(n, dt)
            self.mine.add(id(buf))
        return buf.reshape(shape)

    def owns(self, arr: np.ndarray) -> bool:
        base = arr.base if arr.base is not None else arr
        with self._lock:
            return id(base) in self.mine

    def give(self, arr: np.ndarray) -> None:
        base = arr.base if arr.base is not None else arr
        with self._lock:
            if id(base) in self.mine:
                self._free.setdefault((base.size, base.dtype.str), []).append(base)


@dataclass
class StreamStats:
    bytes_read: int = 0
    bytes_written: int = 0
    threads: int = 1
    merged_units: int = 0  # units merged by merge.merge_block (the adapter changes them)


def default_threads() -> int:
    """Worker threads for the merge: the CPUs this process may use, at most 8 (memory grows by
    about two units per thread; the merge is bound by memory bandwidth well before 8)."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    return max(1, min(8, n))


LOOKAHEAD_BYTES = 256 * 1024 * 1024
MAX_WINDOW = 64  # units


class _Unit(NamedTuple):
    """One unit on its way: computed by a worker (``future``), or, for a stored copy (None),
    by the writing thread when the file reaches it; written in file order."""

    tp: TensorPlan
    matrix: int
    rows: slice
    future: Future | None

    @property
    def offset(self) -> int:
        t = self.tp.tensor
        return self.matrix * t.matrix_nbytes + self.rows.start * t.row_nbytes

    @property
    def nbytes(self) -> int:
        return (self.rows.stop - self.rows.start) * self.tp.tensor.row_nbytes


def execute(plan: Plan, out: Sink, *, progress: Progress | None = None, threads: int = 0) -> StreamStats:
    """Run the plan into ``out`` (a GGUFStream, or the merged safetensors): units are computed by
    ``threads`` worker threads and written in file order by this thread."""
    threads = threads or default_threads()
    stats = StreamStats(threads=threads)
    total = sum(t.tensor.nbytes for t in plan.tensors)
    buffers = _Buffers()
    scratch = _Scratch()
    window: deque[_Unit] = deque()  # in file order
    held = 0  # bytes the computed units in the window write (buffers they hold)
    computing = 0  # units in the window given to the workers
    done = 0

    def drain_one() -> None:
        nonlocal held, done, computing
        unit = window.popleft()
        if unit.future is None:
            piece = compute_unit(unit.tp, unit.matrix, unit.rows, [], scratch, buffers.take)
        else:
            held -= unit.nbytes
            computing -= 1
            piece = unit.future.result()
        # a piece in no pool buffer (mapped stored bits, a fresh gather) is never changed: lent, not copied
        out.write(unit.tp.tensor.name, piece, byte_offset=unit.offset, borrow=not buffers.owns(piece))
        buffers.give(piece)  # out.write copied it: the buffer can take another unit
        stats.merged_units += unit.tp.touched or bool(unit.tp.add)
        done += unit.nbytes
        if progress:
            progress(done, total, unit.tp.tensor.name)

    pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="lora2gguf-merge")
    # the parallelism is ours, one unit per worker: BLAS threads inside each worker's small
    # matmuls would only contend with the other workers (measured: no speed-up at all with 2)
    try:
        with threadpool_limits(limits=1, user_api="blas"):
            for tp in plan.tensors:
                if stored_copy(tp):  # mapped and copied by this thread when the file reaches it
                    window.extend(_Unit(tp, matrix, rows, None) for matrix, rows in tp.blocks())
                    continue
                factors = [[read_factors(b) for b in inp.terms] for inp in tp.inputs]
                for matrix, rows in tp.blocks():
                    fut = pool.submit(compute_unit, tp, matrix, rows, factors, scratch, buffers.take)
                    unit = _Unit(tp, matrix, rows, fut)
                    window.append(unit)
                    held += unit.nbytes
                    computing += 1
                    # beyond one unit per worker (and one being written), the workers may run ahead by
                    # LOOKAHEAD_BYTES of computed units: while this thread copies big untouched tensors
                    # (stored copies, queued above at no cost) they merge the tensors that follow
                    while computing > threads + 1 and (held > LOOKAHEAD_BYTES or computing > MAX_WINDOW):
                        drain_one()
            while window:
                drain_one()
    except BaseException:
        for unit in window:
            if unit.future is not None:
                unit.future.cancel()
        pool.shutdown(wait=True, cancel_futures=True)
        out.abort()
        raise
    pool.shutdown(wait=True)
    stats.bytes_read = plan.bytes_to_read
    stats.bytes_written = getattr(out, "bytes_written", done)
    return stats


# --------------------------------------------------------------------------- --save-merged


@dataclass
class MergedShards:
    """--save-merged: the merged model as safetensors shards in the output type, in the
    Hugging Face layout (a :class:`Sink` for :func:`execute` over :func:`plan.merged_plan`)."""

    folder: Path
    writers: dict[str, StreamingWriter] = field(default_factory=dict)
    shard_of: dict[str, str] = field(default_factory=dict)
    dtype: str = "BF16"

    @classmethod
    def create(cls, folder: Path, plan: Plan, max_shard_bytes: int = 5 * 1024**3) -> "MergedShards":
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        dtype = {"f32": "F32", "f16": "F16", "bf16": "BF16"}[plan.outtype]
        groups: list[list[TensorSpec]] = [[]]
        size = 0
        for tp in plan.tensors:
            spec = TensorSpec(tp.tensor.name, dtype, tuple(tp.tensor.shape))
            if groups[-1] and size + spec.nbytes > max_shard_bytes:
                groups.append([])
                size = 0
            groups[-1].append(spec)
            size += spec.nbytes
        self = cls(folder, dtype=dtype)
        n = len(groups)
        for i, specs in enumerate(groups, 1):
            fname = f"model-{i:05d}-of-{n:05d}.safetensors" if n > 1 else "model.safetensors"
            self.writers[fname] = StreamingWriter(folder / fname, specs, {"format": "pt"})
            for s in specs:
                self.shard_of[s.name] = fname
        return self

    def write(self, name: str, data: np.ndarray, byte_offset: int = 0, *, borrow: bool = False) -> None:
        self.writers[self.shard_of[name]].write(name, np.ascontiguousarray(data), byte_offset=byte_offset)

    def abort(self) -> None:
        for w in self.writers.values():
            try:
                w.close()
            except Exception:  # noqa: BLE001 - best effort while another error propagates
                pass

    def finish(self, source_folder: Path) -> None:
        for w in self.writers.values():
            w.close()
        if len(self.writers) > 1:
            index = {"metadata": {"total_size": sum(w.size - w.data_start for w in self.writers.values())},
                     "weight_map": dict(sorted(self.shard_of.items()))}
            (self.folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        for fname in ("config.json", "generation_config.json"):
            src = Path(source_folder) / fname
            if src.exists():
                cfg = json.loads(src.read_text())
                cfg.pop("quantization_config", None)
                (self.folder / fname).write_text(json.dumps(cfg, indent=2))


def require_space(folder: Path, needed: int) -> None:
    import shutil

    free = shutil.disk_usage(folder).free
    if free < needed:
        raise OutputError(
            f"{folder}: {needed:,} bytes are needed and only {free:,} are free. Free space or choose another -o folder."
        )


__all__ = ["execute", "MergedShards", "StreamStats", "encode", "compute_unit", "require_space", "default_threads",
           "OUTTYPES", "InputError"]
