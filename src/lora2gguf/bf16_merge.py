"""Fused merge kernels for the common case: a BF16 expert tensor, merged with its LoRA deltas and
written as BF16 in GGUF's layout, in one cache-sized pass per tile of output rows.

The generic route (stream.merged_slab, then encode, then a layout transform) makes a float32
copy of the whole slab, the delta, the rounded bits and the transposed pieces: six or seven
passes over memory per element. Here one tile of GGUF rows (a few tens of rows, ~0.5 MB) is
gathered from the stored bits, widened, merged, rounded and stored while it sits in the cache.

Same arithmetic as the generic route, element by element: the base widened exactly from its
bf16 bits, each delta computed as ``(B_e @ A_e) * scale`` in float32 and added in term order,
one round-to-nearest-even to bf16. The GGUF rows of an expert are the columns of the Hugging
Face (in, out) matrix, so the delta is computed directly in that orientation (``B_e @ A_e``)
and never transposed.

Each output tensor is computed on its own (a split tensor's halves one after the other), so
the GGUF is written in file order (seqwrite streams it with direct writes): for GPT-OSS's
``gate_up_proj`` the gate is the even columns of the source and the up the odd ones
(OUTPUT_COLUMNS), and the B rows of a LoRA pair follow the same selection.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

# GGUF rows per tile: 64 rows x 2880 columns x 4 bytes = 737 KB of float32, within the L2 cache
TILE_ROWS = 64
# source rows per block of the gathering transpose: 160 x 64 columns (measured best on 2880-wide
# experts: twice as fast as one strided copy of the whole tile)
GATHER_ROWS = 160


@dataclass(frozen=True)
class ExpertTerm:
    """One LoRA pair of an expert parameter, for one expert: delta^T = (b @ a) * scale, with
    a (r, in) and b (out, r) float32; delta^T has the GGUF orientation (out, in)."""

    a: np.ndarray
    b: np.ndarray
    scale: float


class Scratch:
    """Tile buffers of one worker thread (reused from tile to tile and expert to expert)."""

    def __init__(self, cols: int, rows: int = TILE_ROWS):
        self.cols, self.rows = cols, rows
        self.bits = np.empty((rows, cols), np.uint16)  # the tile's stored bf16 bits, gathered
        self.acc = np.empty((rows, cols), np.uint32)  # float32 bits of the merged tile
        self.delta = np.empty((rows, cols), np.float32)
        self.tmp = np.empty((rows, cols), np.uint32)

    def fits(self, cols: int) -> bool:
        return cols == self.cols


def _round_into(acc: np.ndarray, tmp: np.ndarray, out: np.ndarray) -> None:
    """float32 bits -> bf16 bits, round to nearest even (finite values; the caller checks)."""
    np.right_shift(acc, 16, out=tmp)
    np.bitwise_and(tmp, 1, out=tmp)
    np.add(tmp, 0x7FFF, out=tmp)
    np.add(tmp, acc, out=tmp)
    np.right_shift(tmp, 16, out=tmp)
    np.copyto(out, tmp, casting="unsafe")


def _merge_tile(acc: np.ndarray, delta: np.ndarray, terms: Sequence[ExpertTerm], rows: slice) -> bool:
    """acc (float32 bits of the base tile) += every delta for GGUF rows `rows`; False if the
    result may hold NaN/Inf (the caller then takes the generic route, which names the cause)."""
    x = acc.view(np.float32)
    for t in terms:
        np.matmul(t.b[rows], t.a, out=delta)
        np.multiply(delta, np.float32(t.scale), out=delta)
        np.add(x, delta, out=x)
    # a sum is NaN/Inf when any element is (it may also overflow on finite data: then the caller
    # redoes the slab the generic way, which gives the same bits or the error)
    return bool(np.isfinite(x.sum(dtype=np.float32)))


def merge_transpose(base: np.ndarray, terms: Sequence[ExpertTerm], out: np.ndarray, scratch: Scratch) -> bool:
    """One expert: base (in, out) bf16 bits (any strides: a column selection works) -> `out`
    (out, in) bf16 bits of base + deltas, transposed.

    Returns False (and leaves `out` undefined) when a NaN/Inf may have appeared."""
    n_in, n_out = base.shape
    with np.errstate(over="ignore", invalid="ignore"):  # NaN/Inf are reported by the return value
        for j in range(0, n_out, scratch.rows):
            rows = slice(j, min(n_out, j + scratch.rows))
            k = rows.stop - j
            acc, bits = scratch.acc[:k], scratch.bits[:k]
            for i in range(0, n_in, GATHER_ROWS):  # transpose in blocks that stay in the L1/L2 cache
                np.copyto(bits[:, i:i + GATHER_ROWS], base[i:i + GATHER_ROWS, rows].T)
            np.left_shift(bits, 16, out=acc, dtype=np.uint32)  # widen: bf16 bits -> float32 bits
            if not _merge_tile(acc, scratch.delta[:k], terms, rows):
                return False
            _round_into(acc, scratch.tmp[:k], out[rows])
    return True


# layout transform (layout.TRANSFORMS) -> for each output tensor, the columns of the source
# (its last axis) that output holds, transposed; a transform not listed has no fused kernel
OUTPUT_COLUMNS: dict[str, tuple[slice, ...]] = {
    "transpose": (slice(None),),
    "transpose_split_interleaved": (slice(0, None, 2), slice(1, None, 2)),
}
