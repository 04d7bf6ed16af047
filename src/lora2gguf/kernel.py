"""The compiled merge kernel (``_kernels.c``), when this install has it.

``pip install`` compiles it where a C compiler is found (setup.py; optional). Without it, or with
``LORA2GGUF_KERNEL=numpy`` in the environment, :func:`merge.merge_block` runs in numpy: the same
bytes (both routes round every element once, correctly; the tests compare them bit for bit), about
twice as slow (bench/bench_merge.py: 1.8-2.1x). :func:`status` says which route a build takes, for doctor and run.json."""

from __future__ import annotations

import ctypes
import os

import numpy as np

ENV = "LORA2GGUF_KERNEL"
#: l2g_kernel_version() of the _kernels.c this code calls
VERSION = 2

_lib = None
_why = ""


def _load():
    global _why
    if os.environ.get(ENV, "").lower() == "numpy":
        _why = f"{ENV}=numpy"
        return None
    try:
        from . import _kernels
    except ImportError:
        _why = "the compiled kernel is not built (no C compiler when lora2gguf was installed)"
        return None
    lib = ctypes.CDLL(_kernels.__file__)
    version = getattr(lib, "l2g_kernel_version", None)
    if version is not None:
        version.restype = ctypes.c_int64
    if version is None or version() != VERSION:
        _why = f"{_kernels.__file__} was built from another version of _kernels.c: reinstall lora2gguf"
        return None
    f = lib.l2g_merge_bf16
    p = ctypes.c_void_p
    i64 = ctypes.c_int64
    f.argtypes = [p, ctypes.c_int, p, i64, i64, i64, i64, p, p, p, ctypes.c_double, ctypes.c_double, p, p, i64]
    f.restype = i64
    lib.l2g_bf16_of.argtypes = [p, i64, p]
    lib.l2g_bf16_of.restype = None
    lib.l2g_half_nonfinite.argtypes = [p, i64, ctypes.c_uint16]
    lib.l2g_half_nonfinite.restype = i64
    return lib


_lib = _load()


def available() -> bool:
    return _lib is not None


def status() -> str:
    """'compiled', or 'numpy (why)'."""
    return "compiled" if _lib is not None else f"numpy ({_why})"


def _ptr(a: np.ndarray) -> int:
    return a.ctypes.data


def merge_bf16(w: np.ndarray, kind: int, row_off: np.ndarray, col_stride: int, n: int, m: int,
               left: np.ndarray | None, right: np.ndarray | None, right_max: np.ndarray | None, add: float,
               coef: float, out: np.ndarray, cand: np.ndarray) -> int:
    """One call of ``l2g_merge_bf16`` (see _kernels.c). ``w``: the array whose first element is
    the origin of ``row_off`` (element offsets, int64) and ``col_stride``; ``left`` (n, K),
    ``right`` (K, m) C-contiguous float64 (None: K = 0); ``out`` (n, m) uint16 C-contiguous;
    ``cand`` int64 (its size is the cap). Returns the number of candidates, -1 (NaN/Inf) or -2."""
    k = 0 if left is None else left.shape[1]
    z = np.zeros(1)
    return _lib.l2g_merge_bf16(_ptr(w), kind, _ptr(row_off), col_stride, n, m, k,
                               _ptr(left if k else z), _ptr(right if k else z), _ptr(right_max if k else z),
                               float(add), float(coef), _ptr(out), _ptr(cand), cand.size)


def bf16_of(x: np.ndarray) -> np.ndarray:
    """The kernel's own one-rounding float64 -> bf16 bits (for the tests)."""
    x = np.ascontiguousarray(x, np.float64)
    out = np.empty(x.shape, np.uint16)
    _lib.l2g_bf16_of(_ptr(x), x.size, _ptr(out))
    return out


def half_nonfinite(bits: np.ndarray, exp_mask: int) -> bool:
    """Whether a C-contiguous uint16 array of bf16 / f16 bit patterns holds an Inf or NaN (its
    exponent field ``exp_mask`` all ones), in one compiled pass."""
    if bits.dtype != np.uint16 or not bits.flags.c_contiguous:
        raise ValueError("half_nonfinite takes a C-contiguous uint16 array")
    return bool(_lib.l2g_half_nonfinite(_ptr(bits), bits.size, exp_mask))
