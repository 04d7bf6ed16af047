"""Execute a plan: source slabs merged with their LoRA deltas in float32, rounded once, written.

Worker threads compute slabs (numpy, BLAS and the reads release the GIL); this thread writes
their results in file order, so the GGUF streams sequentially (seqwrite). Memory is bounded by a
few slabs per worker (plus the LoRA factors of the tensor at hand); the merged model is never
held in memory and, unless asked for with `save_merged`, never written to disk.

Two routes compute a slab, with the same bits: BF16 expert tensors whose outputs are BF16 go
through the fused kernel (bf16_merge), one output tensor at a time; everything else takes the
generic route (float32 slab, every delta added, encode, layout transform).
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
from typing import Callable, Iterator, NamedTuple

import gguf
import numpy as np
from threadpoolctl import threadpool_limits

from . import bf16_merge, lora, numerics
from .adapter import LoraTerm
from .errors import InputError, NumericError, OutputError
from .gguf_out import GGUFStream
from .plan import PACKED_TRANSFORMS, OutTensor, Plan, Step
from .safetensors_io import StreamingWriter, TensorSpec, read_raw, to_f32

# progress(done_bytes, total_bytes, what)
Progress = Callable[[int, int, str], None]


def slabs(step: Step) -> Iterator[slice | None]:
    if not step.slab_rows:
        yield None
        return
    n = step.source.shape[0]
    for start in range(0, n, step.slab_rows):
        yield slice(start, min(n, start + step.slab_rows))


def encode(x: np.ndarray, qtype: gguf.GGMLQuantizationType, name: str) -> np.ndarray:
    if qtype == gguf.GGMLQuantizationType.F32:
        return np.ascontiguousarray(x, dtype=np.float32)
    if qtype == gguf.GGMLQuantizationType.F16:
        return x.astype(np.float16)
    if qtype == gguf.GGMLQuantizationType.BF16:
        return numerics.f32_to_bf16_bits(x, name=name)
    raise ValueError(f"{name}: cannot encode {qtype.name} while streaming")


def _factors(term: LoraTerm) -> tuple[np.ndarray, np.ndarray]:
    return (to_f32(read_raw(term.a), term.a.dtype, name=term.a.name),
            to_f32(read_raw(term.b), term.b.dtype, name=term.b.name))


def merged_slab(step: Step, sl: slice | None, factors: list[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """Base slab + every LoRA delta, float32, in the source's (Hugging Face) layout."""
    x = step.source.read(sl)
    if x.dtype != np.float32 or not x.flags.writeable:
        x = np.array(x, dtype=np.float32)
    for term, (a, b) in zip(step.terms, factors):
        if term.kind == "linear":
            x += lora.linear_delta(a, b, term.scale, fan_in_fan_out=term.fan_in_fan_out, rows=sl)
        else:
            x += lora.expert_delta(a, b, term.scale, term.num_experts, experts=sl)
    return x


def _check_finite(x: np.ndarray, step: Step, sl: slice | None, factors) -> None:
    if np.isfinite(x).all():
        return
    where = "" if sl is None else f" (rows {sl.start}..{sl.stop - 1})"
    base = step.source.read(sl)
    if not np.isfinite(base).all():
        raise NumericError(f"base tensor {step.source.name!r}{where} already holds NaN or Inf: the base checkpoint is damaged")
    for term, (a, b) in zip(step.terms, factors):
        if not (np.isfinite(a).all() and np.isfinite(b).all()):
            raise NumericError(
                f"merged tensor {step.source.name!r}{where} has NaN/Inf: the LoRA pair {term.key} (lora_A/lora_B) in "
                f"{term.a.path} holds NaN or Inf values ({term.a.name} / {term.b.name}). The adapter was saved from a "
                "diverged training run; use an earlier checkpoint."
            )
    keys = ", ".join(t.key for t in step.terms) or "none"
    files = ", ".join(sorted({str(t.a.path) for t in step.terms})) or "the adapter"
    raise NumericError(
        f"merged tensor {step.source.name!r}{where} overflows to NaN/Inf after adding the LoRA pair(s) {keys} "
        f"from {files}; check the adapter's scaling (lora_alpha, r, use_rslora)"
    )


_SAME_TYPE = {"BF16": gguf.GGMLQuantizationType.BF16, "F16": gguf.GGMLQuantizationType.F16,
              "F32": gguf.GGMLQuantizationType.F32}


def _stored_copy(step: Step) -> bool:
    """No LoRA term and every output in the stored type: the bits can be copied (a float32 round
    trip would give the same bits for every finite value)."""
    want = _SAME_TYPE.get(step.source.storage)
    return (not step.terms and not step.packed and want is not None and step.source.read_stored is not None
            and all(t.qtype == want for t in step.outputs))


def _check_stored_finite(raw: np.ndarray, step: Step, sl: slice | None) -> None:
    if raw.dtype == np.uint16:  # bf16 bits: exponent all ones is Inf or NaN
        bad = bool(np.any((raw & np.uint16(0x7F80)) == np.uint16(0x7F80)))
    else:
        bad = not np.isfinite(raw).all()
    if bad:
        where = "" if sl is None else f" (rows {sl.start}..{sl.stop - 1})"
        raise NumericError(f"base tensor {step.source.name!r}{where} already holds NaN or Inf: "
                           "the base checkpoint is damaged")


@dataclass
class MergedShards:
    """--save-merged: the merged model as safetensors shards in BF16 (or the output type's float)."""

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
        for step in plan.steps:
            spec = TensorSpec(step.source.name, dtype, tuple(step.source.shape))
            if groups[-1] and size + spec.nbytes > max_shard_bytes:
                groups.append([])
                size = 0
            groups[-1].append(spec)
            size += spec.nbytes
        self = cls(folder, dtype=dtype)
        n = len(groups)
        for i, specs in enumerate(groups, 1):
            fname = f"model-{i:05d}-of-{n:05d}.safetensors" if n > 1 else "model.safetensors"
            w = StreamingWriter(folder / fname, specs, {"format": "pt"})
            self.writers[fname] = w
            for s in specs:
                self.shard_of[s.name] = fname
        return self

    def write(self, step: Step, sl: slice | None, x: np.ndarray) -> None:
        fname = self.shard_of[step.source.name]
        itemsize = {"F32": 4, "F16": 2, "BF16": 2}[self.dtype]
        row = math.prod(step.source.shape[1:]) * itemsize
        data = {"F32": lambda v: v.astype(np.float32), "F16": lambda v: v.astype(np.float16),
                "BF16": lambda v: numerics.f32_to_bf16_bits(v)}[self.dtype](x)
        self.writers[fname].write(step.source.name, data, byte_offset=(sl.start * row) if sl else 0)

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


@dataclass
class StreamStats:
    bytes_read: int = 0
    bytes_written: int = 0
    threads: int = 1
    fused_slabs: int = 0  # slabs merged by the fused BF16 kernels (bf16_merge)


def default_threads() -> int:
    """Worker threads for the merge: the CPUs this process may use, at most 8 (memory grows by
    about two slabs per thread; the merge is bound by memory bandwidth well before 8)."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    return max(1, min(8, n))


def _takes_fused_route(step: Step, merged: MergedShards | None) -> bool:
    """Whether the fused kernel (bf16_merge) computes this step: a BF16 expert tensor with expert
    LoRA terms only, a layout the kernel knows, every output BF16, and no --save-merged."""
    src = step.source
    return (merged is None and not step.packed and bool(step.terms) and step.transform in bf16_merge.OUTPUT_COLUMNS
            and src.storage == "BF16" and src.read_stored is not None and len(src.shape) == 3
            and all(t.kind != "linear" for t in step.terms)
            and all(o.qtype == gguf.GGMLQuantizationType.BF16 for o in step.outputs))


class _Buffers:
    """Output buffers of the fused route, given back once written: a fresh 16 MB array per slab
    would cost page faults and zeroing of every byte (measured: 5% of a build's CPU)."""

    def __init__(self):
        self._free: dict[int, list[np.ndarray]] = {}
        self._lock = threading.Lock()

    def take(self, shape: tuple[int, ...]) -> np.ndarray:
        n = math.prod(shape)
        with self._lock:
            free = self._free.get(n)
            buf = free.pop() if free else None
        return (np.empty(n, np.uint16) if buf is None else buf).reshape(shape)

    def give(self, arr: np.ndarray) -> None:
        with self._lock:
            self._free.setdefault(arr.size, []).append(arr.reshape(-1))


class _Worker(threading.local):
    """Per-thread reusable buffers."""

    def __init__(self, buffers: _Buffers):
        self.scratch: bf16_merge.Scratch | None = None
        self.buffers = buffers  # shared by every thread

    def scratch_for(self, cols: int) -> bf16_merge.Scratch:
        if self.scratch is None or not self.scratch.fits(cols):
            self.scratch = bf16_merge.Scratch(cols)
        return self.scratch


def _fused_slab(step: Step, sl: slice, which: int, factors, worker: _Worker) -> np.ndarray | None:
    """Output `which` of `step` for experts `sl`, merged by the fused kernel; None when a NaN/Inf
    may have appeared (the caller redoes the slab the generic way, which explains it)."""
    src = step.source
    cols = bf16_merge.OUTPUT_COLUMNS[step.transform][which]
    raw = src.read_stored(sl)  # (experts, in, out) bf16 bits, mapped
    piece = worker.buffers.take((sl.stop - sl.start,) + tuple(step.outputs[which].shape[1:]))
    scratch = worker.scratch_for(src.shape[1])
    for i, e in enumerate(range(sl.start, sl.stop)):
        terms = []
        for term, (a, b) in zip(step.terms, factors):
            a_e, b_e = lora.expert_factors(a, b, term.num_experts, e)
            terms.append(bf16_merge.ExpertTerm(a_e, np.ascontiguousarray(b_e[cols]), term.scale))
        if not bf16_merge.merge_transpose(raw[i][:, cols], terms, piece[i], scratch):
            worker.buffers.give(piece)
            return None
    return piece


def _compute(plan: Plan, step: Step, sl: slice | None, which: int | None, factors, want_merged: bool,
             fused: bool, stored_copy: bool, worker: _Worker) -> tuple[list[np.ndarray], np.ndarray | None, bool]:
    """One slab: (GGUF pieces: step.outputs[which] only, or every output when `which` is None;
    the merged float32 slab if wanted; computed by the fused kernel?)."""
    if step.packed:  # --keep-mxfp4: ggml MXFP4 blocks, bits moved, nothing decoded
        return list(PACKED_TRANSFORMS[step.transform](step.source.read_packed(sl))), None, False
    if stored_copy and not want_merged:  # untouched, same type: the stored bits as they are
        raw = step.source.read_stored(sl)
        _check_stored_finite(raw, step, sl)
        return list(plan.arch.transforms[step.transform](raw)), None, False
    if fused:
        piece = _fused_slab(step, sl, which, factors, worker)
        if piece is not None:
            return [piece], None, True
    x = merged_slab(step, sl, factors)
    _check_finite(x, step, sl, factors)
    qtypes = {t.qtype for t in step.outputs}
    if len(qtypes) == 1:  # encoding is per element: encode first, move half the bytes
        pieces = list(plan.arch.transforms[step.transform](encode(x, qtypes.pop(), step.outputs[0].name)))
    else:
        pieces = [encode(p, t.qtype, t.name) for t, p in zip(step.outputs, plan.arch.transforms[step.transform](x))]
    if which is not None:
        pieces = [pieces[which]]
    return pieces, (x if want_merged else None), False


def _units(step: Step, fused: bool) -> Iterator[tuple[slice | None, int | None]]:
    """(slab, output) in the order the GGUF's bytes are laid out: a fused step computes each of its
    outputs on its own (a split tensor's first half for every slab, then the second); the generic
    route computes every output of a slab at once (the later ones land ahead of the file order)."""
    if fused:
        for which in range(len(step.outputs)):
            for sl in slabs(step):
                yield sl, which
    else:
        for sl in slabs(step):
            yield sl, None


LOOKAHEAD_BYTES = 256 * 1024 * 1024
MAX_WINDOW = 64  # slabs


class _Unit(NamedTuple):
    """One slab of one step on its way: computed by a worker, written by the caller in file order."""

    step: Step
    sl: slice | None
    which: int | None  # the one output computed (fused route), or None: every output
    future: Future

    @property
    def outputs(self) -> tuple[OutTensor, ...]:
        return self.step.outputs if self.which is None else (self.step.outputs[self.which],)

    def offset(self, t: OutTensor) -> int:
        """Byte offset of this slab within output tensor `t`."""
        return self.sl.start * t.row_nbytes if self.sl is not None else 0

    @property
    def nbytes(self) -> int:
        """Bytes this slab writes."""
        if self.sl is None:
            return sum(t.nbytes for t in self.outputs)
        return sum(t.row_nbytes for t in self.outputs) * (self.sl.stop - self.sl.start)


def execute(plan: Plan, out: GGUFStream, *, merged: MergedShards | None = None,
            progress: Progress | None = None, threads: int = 0) -> StreamStats:
    """Run the plan: slabs are computed by `threads` worker threads (numpy and the reads release
    the GIL) and written in file order by this thread, so at most a few slabs are in memory."""
    threads = threads or default_threads()
    stats = StreamStats(threads=threads)
    total = plan.bytes_to_read
    if merged is not None and plan.kept_mxfp4:
        out.abort()
        raise InputError("--save-merged with --keep-mxfp4: the merged safetensors need the experts decoded; "
                         "run --save-merged without --keep-mxfp4")
    buffers = _Buffers()
    worker = _Worker(buffers)
    window: deque[_Unit] = deque()  # in file order
    held = 0  # bytes the slabs in the window write

    def drain_one() -> None:
        nonlocal held
        unit = window.popleft()
        held -= unit.nbytes
        pieces, x, fused = unit.future.result()
        if merged is not None:
            merged.write(unit.step, unit.sl, x)
        for t, piece in zip(unit.outputs, pieces):
            out.write(t.name, piece, byte_offset=unit.offset(t))
            if fused:  # out.write copied it: the buffer can take another slab
                buffers.give(piece)
        stats.fused_slabs += fused
        src = unit.step.source
        src_rows = src.shape[0] if src.shape else 1
        done = (unit.sl.stop - unit.sl.start) if unit.sl is not None else src_rows
        share = len(unit.step.outputs) // len(unit.outputs)  # a fused slab is read once per output
        stats.bytes_read += src.stored_bytes * done // max(src_rows, 1) // share
        if progress:
            progress(stats.bytes_read, total, src.name)

    pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="lora2gguf-merge")
    # the parallelism is ours, one slab per worker: BLAS threads inside each worker's small
    # matmuls would only contend with the other workers (measured: no speed-up at all with 2)
    try:
        with threadpool_limits(limits=1, user_api="blas"):
            for step in plan.steps:
                factors = [_factors(t) for t in step.terms]
                fused = _takes_fused_route(step, merged)
                stored_copy = _stored_copy(step)
                for sl, which in _units(step, fused):
                    unit = _Unit(step, sl, which, pool.submit(_compute, plan, step, sl, which, factors,
                                                              merged is not None, fused, stored_copy, worker))
                    window.append(unit)
                    held += unit.nbytes
                    # beyond one slab per worker (and one being written), the workers may run ahead by
                    # LOOKAHEAD_BYTES: while the writer is busy with big untouched tensors (hashing and
                    # copying, no arithmetic) they merge the experts that follow
                    while len(window) > threads + 1 and (held > LOOKAHEAD_BYTES or len(window) > MAX_WINDOW):
                        drain_one()
            while window:
                drain_one()
    except BaseException:
        for unit in window:
            unit.future.cancel()
        pool.shutdown(wait=True, cancel_futures=True)
        out.abort()
        raise
    pool.shutdown(wait=True)
    stats.bytes_written = out.bytes_written
    return stats


def require_space(folder: Path, needed: int) -> None:
    import shutil

    free = shutil.disk_usage(folder).free
    if free < needed:
        raise OutputError(
            f"{folder}: {needed:,} bytes are needed and only {free:,} are free. Free space or choose another -o folder."
        )
