"""Layout transforms between Hugging Face and GGUF tensors: pure functions over slabs.

Each function takes a float32 slab (a run of the source tensor's leading axis) and returns a
tuple of slabs, one per output tensor. They never copy more than the slab.
"""

from __future__ import annotations

import numpy as np


def copy(x: np.ndarray) -> tuple[np.ndarray]:
    return (x,)


def transpose_last2(x: np.ndarray) -> tuple[np.ndarray]:
    """(..., a, b) -> (..., b, a): HF expert weights are (E, in, out), GGUF's (E, out, in)."""
    return (np.ascontiguousarray(np.swapaxes(x, -1, -2)),)


def split_interleaved_last(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(..., 2n) with even/odd columns interleaved -> the even part, the odd part."""
    return np.ascontiguousarray(x[..., 0::2]), np.ascontiguousarray(x[..., 1::2])


def transpose_split_interleaved(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(E, in, 2n) fused, interleaved -> (E, n, in) even, (E, n, in) odd."""
    even, odd = split_interleaved_last(x)
    return transpose_last2(even)[0], transpose_last2(odd)[0]


TRANSFORMS = {
    "copy": copy,
    "transpose": transpose_last2,
    "split_interleaved": split_interleaved_last,
    "transpose_split_interleaved": transpose_split_interleaved,
}
