"""The merge arithmetic: every merged element is ``W + sum_t s_t * (B_t @ A_t)``, computed
exactly enough to be rounded once, to nearest even, to the output type. Pure numpy, no state.

The rule (:data:`RULE`, recorded in run.json), element by element: with each LoRA term's scale
folded into its B factor (``bs = s * B`` in float64, one rounding per factor element, the same
values whatever layout the element ends up in), the merged value is

    S = W + add + a_1 * bs_1 + ... + a_K * bs_K      (each product a float64 number)

the exact sum of the base value, an optional constant (norms stored as ``w + 1``) and the
float64 products over every rank index of every LoRA term, rounded once to bf16, f16 or f32.
S does not depend on the order of anything, so the bytes do not depend on BLAS, the CPU,
threads, tile sizes or which route computed them.

How it is computed fast. ``V = W + left @ right`` goes through BLAS in float64 (``left`` holds
the ``bs`` rows, ``right`` the ``a`` columns, or the other way round: the products are the
same). Whatever BLAS's summation order, blocking or FMA use, ``|V - S| <= E`` with
``E = (K + 8) * 2**-52 * (max|V| + sum_k max|left_k| * max|right_k|)`` (the classic bound
gamma_K * sum|products| for any summation order, plus the roundings of the additions, with a
factor two to spare). Where the interval ``V +- E`` holds no rounding boundary of the output
type, round(V) == round(S) by monotonicity. The rare elements where it may hold one are found
cheaply (for bf16, from the float32 bits of V: within two float32 steps of a bf16 tie, or so
small that E is not far below a float32 step), then either rounded from V directly in one
rounding, or, when ``V +- E`` really straddles a boundary, summed exactly (:func:`exact_round`).

Where this install has the compiled kernel (:mod:`lora2gguf.kernel`), a bf16 block whose base
values are read in place (:class:`Gather`) is merged by it in one pass: the same V, a bound of
the same form per run of 16 elements, and every element whose interval rounds two ways handed
back to :func:`exact_round`; so the bytes are those of the numpy route (tested bit for bit).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from . import kernel, numerics

RULE = ("each merged element is the exact sum of W and the float64 products a * (scale * b) over every "
        "rank index of every LoRA term (computed in float64; summed exactly wherever the float64 result "
        "is within its error bound of a rounding boundary), rounded once, to nearest even, to the output "
        "type; the bytes do not depend on the CPU, BLAS, threads or tiling")

#: elements per tile (2 MB of float64 in flight): whole rows, at least one. Measured
#: (bench/bench_merge.py shapes, one thread): against tiles of 32 rows, the same speed for rows of
#: 2880 to 14336 and up to 2x faster for narrow matrices such as small MoE experts (rows of 768
#: or 2048: numpy's per-call cost dominated small tiles)
TILE_ELEMENTS = 1 << 18


def tile_rows(n: int, m: int) -> int:
    """Rows per tile of an (n, m) block."""
    return max(1, min(n, TILE_ELEMENTS // max(1, m)))

_U = 2.0 ** -52
DTYPES = ("bf16", "f16", "f32")

# W tile source: (first row, last row + 1, float32 buffer of (rows, m)) -> float32 (rows, m)
TileSource = Callable[[int, int, np.ndarray], np.ndarray]


#: source rows gathered per step of a transposing gather: 160 rows x 32 columns of bf16 stay in
#: the L1 cache (measured best on 2880-wide experts)
GATHER_ROWS = 160
#: candidates the compiled kernel may hand back per block before the block is redone in numpy
CANDIDATE_CAP = 1 << 16


@dataclass(frozen=True)
class Gather:
    """The base values of a block, read in place: element (i, j) is ``x[rows[i], j]`` with ``x``
    the stored matrix ``src`` (transposed when ``transpose``) cut to the columns ``cols``.
    ``src``: 2-D, bf16 bit patterns (uint16) or float32 values, any strides (a mapped file)."""

    src: np.ndarray
    transpose: bool
    rows: np.ndarray  # int64, one per output row
    cols: slice = field(default_factory=lambda: slice(None))

    @property
    def bf16(self) -> bool:
        return self.src.dtype == np.uint16

    @property
    def x(self) -> np.ndarray:
        return (self.src.T if self.transpose else self.src)[:, self.cols]

    def strided(self) -> tuple[np.ndarray, np.ndarray, int]:
        """(origin array, element offset of each row, column stride in elements): element (i, j)
        is at ``origin + row_off[i] + j * col_stride`` (the compiled kernel's reads)."""
        x = self.x
        size = x.itemsize
        return x, np.ascontiguousarray(self.rows, np.int64) * (x.strides[0] // size), x.strides[1] // size

    def value(self, i: int, j: int) -> float:
        v = self.x[int(self.rows[i]), j]
        return float(numerics.bf16_bits_to_f32(np.array([v]))[0]) if self.bf16 else float(v)

    def tile(self, r0: int, r1: int, buf: np.ndarray, work: "Work") -> np.ndarray:
        """Rows r0..r1 as float32 into ``buf`` (rows, m): bf16 bits widened on the way, a
        transposed matrix gathered in blocks that stay in the cache."""
        sel = self.rows[r0:r1]
        rows, cols = buf.shape
        if not self.bf16:
            np.copyto(buf, self.x[sel], casting="same_kind")
            return buf
        bits = work.get("gather", rows * cols, np.uint16).reshape(rows, cols)
        if self.transpose:
            src = self.src[self.cols]
            for i in range(0, src.shape[0], GATHER_ROWS):
                np.copyto(bits[:, i:i + GATHER_ROWS], src[i:i + GATHER_ROWS, sel].T)
        else:
            np.copyto(bits, self.src[sel][:, self.cols])
        np.left_shift(bits, 16, out=buf.view(np.uint32), dtype=np.uint32)
        return buf


class Work:
    """Per-thread scratch buffers of :func:`merge_block`, reused from call to call."""

    def __init__(self):
        self._bufs: dict[tuple[str, int, str], np.ndarray] = {}

    def get(self, key: str, n: int, dtype) -> np.ndarray:
        dt = np.dtype(dtype)
        buf = self._bufs.get((key, n, dt.str))
        if buf is None:
            buf = self._bufs[(key, n, dt.str)] = np.empty(n, dt)
        return buf


def exact_round(values, dtype: str):
    """The exact sum of ``values`` (float64 numbers) rounded once to ``dtype`` (a numpy scalar of
    :func:`numerics.round_f64`'s type). ``math.fsum`` gives the sum rounded to float64, C; when C
    is itself a rounding boundary of ``dtype``, the sign of the exact remainder says which side the
    sum lies on (C's float64 neighbour on that side rounds the same way as the sum)."""
    vals = [float(v) for v in values]
    c = math.fsum(vals)
    down = numerics.round_f64(np.array([math.nextafter(c, -math.inf)]), dtype)
    up = numerics.round_f64(np.array([math.nextafter(c, math.inf)]), dtype)
    if _bits(down) == _bits(up):
        return numerics.round_f64(np.array([c]), dtype)[0]
    rest = math.fsum(vals + [-c])  # the exact sum minus C, rounded: its sign is exact
    side = math.nextafter(c, math.inf if rest > 0 else -math.inf) if rest else c
    return numerics.round_f64(np.array([side]), dtype)[0]


def tree_sum_rows(x: np.ndarray) -> np.ndarray:
    """Row sums in a fixed pairwise order (zero-padded to a power of two, halves added
    elementwise): the same bits on any CPU, whatever numpy's or BLAS's reductions do."""
    n, m = x.shape
    p = 1 << max(0, (m - 1).bit_length())
    buf = np.zeros((n, p), np.float64)
    buf[:, :m] = x
    while p > 1:
        p //= 2
        np.add(buf[:, :p], buf[:, p:2 * p], out=buf[:, :p])
    return buf[:, 0].copy()


def dora_rows(w_row: np.ndarray, add: float, left_row: np.ndarray | None, right: np.ndarray | None,
              magnitude: float) -> np.ndarray:
    """The DoRA rule's reference value of one row, in a fixed order: W + add + sum_k l_k * r_k
    accumulated elementwise k by k in float64, its norm by :func:`tree_sum_rows`, then
    magnitude / norm times each element (PEFT's DoRA merge, evaluated deterministically)."""
    acc = np.asarray(w_row, np.float64) + add
    if left_row is not None:
        for k in range(left_row.shape[0]):
            acc = acc + left_row[k] * right[k]
    norm = math.sqrt(tree_sum_rows((acc * acc)[None, :])[0])
    return (magnitude / norm) * acc


def _bits(a: np.ndarray) -> np.ndarray:
    return a.view(np.uint16 if a.dtype.itemsize == 2 else np.uint32)


def _bf16_candidates(bits: np.ndarray, tmp: np.ndarray, err: float) -> np.ndarray:
    """Flat indices of the elements whose bf16 rounding from these float32 bits (of V) may differ
    from the single rounding of C: within two float32 steps of a bf16 tie (low 16 bits 0x7FFF,
    0x8000 or 0x8001; 0x8000 is also where rounding through float32 rounds twice), or small
    enough that ``err`` may reach a quarter float32 step (|x| < err * 2**26)."""
    np.subtract(bits, np.uint32(0x7FFF), out=tmp)
    np.bitwise_and(tmp, np.uint32(0xFFFF), out=tmp)
    cand = tmp <= 2
    if err > 0:
        thr = np.float32(min(err * 2.0 ** 26, 3.0e38))
        np.bitwise_and(bits, np.uint32(0x7FFFFFFF), out=tmp)
        cand |= tmp < thr.view(np.uint32)
    return np.flatnonzero(cand)


def _settle(v: np.ndarray, flat_out: np.ndarray, idx: np.ndarray, err: float, vabs: float, dtype: str,
            exact: Callable[[int], np.generic]) -> None:
    """The candidates ``idx`` (flat): rounded once from V where V +- err holds no rounding boundary,
    else the exact sum rounded once (``exact(i)``)."""
    vals = v.reshape(-1)[idx]
    e2 = err + _U * (vabs + err)  # the two additions below may round inward by half a float64 step
    both = numerics.round_f64(np.concatenate([vals - e2, vals + e2, vals]), dtype)  # one call: tiny arrays
    n = vals.size
    lo, hi, rounded = both[:n], both[n:2 * n], both[2 * n:].copy()
    same = _bits(lo) == _bits(hi)
    for h in np.flatnonzero(~same):
        rounded[h] = exact(int(idx[h]))
    flat_out[idx] = rounded


def merge_block(w: np.ndarray | TileSource | Gather, shape: tuple[int, int], left: np.ndarray | None,
                right: np.ndarray | None, dtype: str, *, out: np.ndarray, add: float = 0.0,
                work: Work | None = None, row_scale: np.ndarray | None = None) -> bool:
    """Merge one block of rows and round it into ``out`` by the rule above.

    ``w``: the base values, float32 (or float64) of ``shape`` (n, m), or a function giving them a
    tile of rows at a time, or a :class:`Gather` reading them in place (the compiled kernel's
    input; tiles gathered in the cache for numpy); ``left`` (n, K) and
    ``right`` (K, m) float64 with ``left @ right`` the sum of the LoRA deltas in this block's
    layout (None or K = 0: no delta); ``add``: a constant added to every element; ``out``:
    (n, m) uint16 bit patterns for bf16/f16, float32 for f32; ``row_scale``: DoRA's magnitude per
    row (float64): each merged row is scaled to ``magnitude / ||row||`` (the norm in a fixed
    order, :func:`tree_sum_rows`), and the rule is then "rounded once from the fixed-order float64
    evaluation" (:func:`dora_rows`), with the same bound-and-settle scheme.

    Returns False (``out`` then undefined) when a merged value is NaN or Inf; the caller finds
    the cause."""
    if dtype not in DTYPES:
        raise ValueError(f"merge_block: output type {dtype!r} is not one of {DTYPES}")
    n, m = shape
    work = work or Work()
    k = 0 if left is None else left.shape[1]
    extra = 1 if add else 0
    if isinstance(w, Gather):
        if (dtype == "bf16" and row_scale is None and kernel.available() and out.flags.c_contiguous
                and w.src.dtype in (np.uint16, np.float32)):
            done = _merge_compiled(w, shape, left, right, add, out, work)
            if done is not None:
                return done
        gather = w

        def w(r0: int, r1: int, buf: np.ndarray) -> np.ndarray:
            return gather.tile(r0, r1, buf, work)
    tile = tile_rows(n, m)
    d_all = work.get("d", tile * m, np.float64)
    w_all = work.get("w", tile * m, np.float32)
    x_all = work.get("x", tile * m, np.float32)
    t_all = work.get("t", tile * m, np.uint32)
    right_max = np.abs(right).max(axis=1) if k else None
    for r0 in range(0, n, tile):
        r1 = min(n, r0 + tile)
        rows = r1 - r0
        d = d_all[: rows * m].reshape(rows, m)
        if callable(w):
            wt = w(r0, r1, w_all[: rows * m].reshape(rows, m))
        else:
            wt = w[r0:r1]
        with np.errstate(over="ignore", invalid="ignore"):  # NaN/Inf are reported by the return value
            if k:
                np.matmul(left[r0:r1], right, out=d)
                np.add(d, wt, out=d)
            else:
                np.copyto(d, wt)
            if add:
                np.add(d, add, out=d)
            hi, lo = d.max(), d.min()
        if not (math.isfinite(hi) and math.isfinite(lo)):
            return False
        vabs = max(abs(hi), abs(lo))
        err = 0.0
        if k or extra:
            s = float(np.dot(np.abs(left[r0:r1]).max(axis=0), right_max)) if k else 0.0
            err = (k + extra + 8) * _U * (vabs + s)
        dora = None
        if row_scale is not None:
            dora = _dora_scale(d, row_scale[r0:r1], err, vabs)
            if dora is None:
                return False
            err, vabs = dora
        o = out[r0:r1]
        if dtype == "bf16":
            x = x_all[: rows * m].reshape(rows, m)
            with np.errstate(over="ignore"):
                np.copyto(x, d, casting="unsafe")
            bits = x.view(np.uint32)
            t = t_all[: rows * m].reshape(rows, m)
            numerics.bf16_round_into(bits, t, o)
            idx = _bf16_candidates(bits, t, err)
        else:
            with np.errstate(over="ignore"):
                if dtype == "f16":
                    np.copyto(o, d.astype(np.float16).view(np.uint16))
                else:
                    np.copyto(o, d, casting="unsafe")
            if err == 0.0:
                continue
            e2 = err + _U * (vabs + err)
            ft = np.float16 if dtype == "f16" else np.float32
            with np.errstate(over="ignore"):
                idx = np.flatnonzero((d - e2).astype(ft) != (d + e2).astype(ft))
        if idx.size:
            base = np.asarray(wt, np.float64)
            if row_scale is not None:
                rows_done: dict[int, np.ndarray] = {}

                def exact(i: int, _r0=r0, _base=base, _done=rows_done):
                    row, col = divmod(i, m)
                    if row not in _done:
                        _done[row] = dora_rows(_base[row], add, left[_r0 + row] if k else None, right if k else None,
                                               float(row_scale[_r0 + row]))
                    return numerics.round_f64(_done[row][col:col + 1], dtype)[0]
            else:
                def exact(i: int, _r0=r0, _base=base):
                    row, col = divmod(i, m)
                    products = left[_r0 + row] * right[:, col] if k else ()
                    return exact_round([_base[row, col], add, *products], dtype)

            _settle(d, o.reshape(-1), idx, err, vabs, dtype, exact)
    return True


def _merge_compiled(w: Gather, shape: tuple[int, int], left, right, add: float, out: np.ndarray,
                    work: Work) -> bool | None:
    """merge_block's bf16 route through the compiled kernel; None: too many elements near a
    rounding boundary for its candidate list (the caller redoes the block in numpy)."""
    n, m = shape
    k = 0 if left is None else left.shape[1]
    if k:
        left, right = np.ascontiguousarray(left, np.float64), np.ascontiguousarray(right, np.float64)
    right_max = np.ascontiguousarray(np.abs(right).max(axis=1)) if k and m else None
    coef = (k + (1 if add else 0) + 8) * _U if (k or add) else 0.0
    origin, row_off, col_stride = w.strided()
    # the kernel reads and writes raw memory: every shape is checked here, never out of bounds
    if (origin.shape[1] != m or row_off.shape != (n,) or out.dtype != np.uint16 or out.size != n * m
            or (n and not 0 <= int(w.rows.min()) <= int(w.rows.max()) < origin.shape[0])
            or (k and (left.shape != (n, k) or right.shape != (k, m)))):
        raise ValueError(f"merge_block: a gather of {len(w.rows)} rows x {origin.shape[1]} columns, factors "
                         f"{None if not k else (left.shape, right.shape)} and out {out.shape} {out.dtype} for a "
                         f"block of {n} x {m}")
    cand = work.get("cand", CANDIDATE_CAP, np.int64)
    got = kernel.merge_bf16(origin, 0 if w.bf16 else 1, row_off, col_stride, n, m, left, right, right_max, add,
                            coef, out, cand)
    if got == -1:
        return False
    if got == -2:
        return None
    flat = out.reshape(-1)
    for idx in cand[:got]:
        i, j = divmod(int(idx), m)
        products = left[i] * right[:, j] if k else ()
        flat[idx] = exact_round([w.value(i, j), add, *products], "bf16")
    return True


def _dora_scale(d: np.ndarray, magnitude: np.ndarray, err: float, vabs: float) -> tuple[float, float] | None:
    """Scale each row of the merged tile ``d`` (in place) by magnitude / ||row||; returns the new
    error bound against :func:`dora_rows` and the new max |value| (None: a zero or non-finite norm).

    With |V - S| <= err and the fixed-order reference V' also within err of S, |V - V'| <= 2 err;
    the norm then moves by at most sqrt(m) * 2 err plus its own roundings, and so does the factor
    relative to it; the product adds one rounding."""
    m = d.shape[1]
    norms = np.sqrt(tree_sum_rows(d * d))
    with np.errstate(divide="ignore", invalid="ignore"):
        f = np.asarray(magnitude, np.float64) / norms
    if not np.isfinite(f).all() or not (norms > 0).all():
        return None
    vmax = np.abs(d).max(axis=1)
    d *= f[:, None]
    e1 = 2 * err + _U * vabs
    levels = max(1, (m - 1).bit_length())
    rel_n = (math.sqrt(m) * e1) / norms + (2 * levels + 8) * _U
    per_row = np.abs(f) * e1 + vmax * np.abs(f) * (1.01 * rel_n + 2 * _U) + 2 * _U * np.abs(f) * vmax
    new_vabs = float((np.abs(f) * vmax).max()) if m else 0.0
    return float(per_row.max()) + 2 * _U * new_vabs, new_vabs
