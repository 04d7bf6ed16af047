"""Numeric kernels for lora2gguf, as pure functions over numpy arrays (no torch).

- bfloat16: float32 -> bf16 bits with round-to-nearest-even (as ggml / gguf-py and torch do),
  and back.
- MXFP4 as transformers' MXFP4 checkpoints store MoE experts (``*_blocks`` + ``*_scales``):
  decode, encode (for fixtures), and a lossless repack into ggml's ``block_mxfp4`` layout.
- bitsandbytes 4-bit (NF4 / FP4, with and without nested "double" quantization of absmax)
  and LLM.int8 (``SCB``): decode with numpy only, parse the state-dict layout bitsandbytes
  saves, and encode the same layout for fixtures.

Facts used here (formats, tables, formulas) come from the OCP Microscaling spec v1.0,
transformers' ``integrations/mxfp4.py``, ggml's ``block_mxfp4`` and bitsandbytes'
``functional.py`` / ``backends/default/ops.py``; the code is our own.

Every decoder returns float32 and never makes float64 copies of tensor-sized data; large
inputs are processed in chunks so temporaries stay small.
"""

from __future__ import annotations

import json
import sys
from typing import Mapping, NamedTuple

import numpy as np

from .errors import FormatError, UnsupportedError

__all__ = [
    "f32_to_bf16_bits",
    "bf16_bits_to_f32",
    "round_to_bf16",
    "f64_to_bf16_bits",
    "f64_to_f16_bits",
    "round_f64",
    "bf16_round_into",
    "half_bits_finite",
    "FP4_E2M1_VALUES",
    "E8M0_BIAS",
    "MXFP4_BLOCK",
    "e8m0_to_f32",
    "decode_mxfp4",
    "decode_mxfp4_expert",
    "transpose_last2",
    "encode_mxfp4",
    "mxfp4_hf_to_ggml",
    "NF4_CODE",
    "BNB_FP4_CODE",
    "bnb_4bit_code",
    "bnb_dynamic_map",
    "NestedAbsmax",
    "decode_bnb_nested_absmax",
    "decode_bnb_4bit",
    "parse_bnb_quant_state",
    "decode_bnb_4bit_state",
    "encode_bnb_4bit",
    "decode_bnb_int8",
]

# Elements processed per chunk by the chunked kernels (bounds temporaries to a few tens of MB).
_CHUNK = 1 << 22
# Elements per chunk for element-wise kernels whose temporaries should stay in cache.
_SMALL_CHUNK = 1 << 16
# Tile edge of the cache-blocked transpose.
_TILE = 512


def _where(name: str | None) -> str:
    return f" in tensor '{name}'" if name else ""


# --------------------------------------------------------------------------------------------
# bfloat16
# --------------------------------------------------------------------------------------------

def f32_to_bf16_bits(x: np.ndarray, *, name: str | None = None) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (uint16, same shape), round-to-nearest-even.

    Same rule as ggml's ``ggml_compute_fp32_to_bf16`` and gguf-py's BF16 quantizer:
    finite values round to nearest, ties to even, and overflow past the largest finite bf16
    rounds to +-Inf as IEEE does; Inf stays Inf; subnormals are rounded, not flushed; NaN
    stays NaN, made quiet, keeping its sign and top payload bits (``(bits >> 16) | 0x40``).
    (torch maps every NaN to 0x7FC0, dropping the sign; finite values and Inf agree.)

    float16 input is widened exactly; float64 is refused (it would round twice).
    """
    x = np.asarray(x)
    if x.dtype == np.float16:
        x = x.astype(np.float32)
    if x.dtype != np.float32:
        raise FormatError(
            f"f32_to_bf16_bits expects float32 data{_where(name)}, got {x.dtype}; "
            "convert it to float32 first (a float64 source would be rounded twice)"
        )
    x = np.ascontiguousarray(x)
    flat = x.reshape(-1)
    bits = flat.view(np.uint32)
    out = np.empty(bits.shape, dtype=np.uint16)
    tmp = np.empty(min(bits.size, _SMALL_CHUNK), dtype=np.uint32)
    for i in range(0, bits.size, _SMALL_CHUNK):
        b = bits[i:i + _SMALL_CHUNK]
        t = tmp[: b.size]
        # bias 0x7FFF plus the lsb of the kept half: ties go to the even result.
        # No uint32 overflow: the largest non-NaN pattern is 0xFF800000 (-Inf).
        np.right_shift(b, np.uint32(16), out=t)
        t &= np.uint32(1)
        t += np.uint32(0x7FFF)
        t += b
        t >>= np.uint32(16)
        o = out[i:i + _SMALL_CHUNK]
        o[...] = t
        nan = np.isnan(flat[i:i + _SMALL_CHUNK])
        if nan.any():
            o[nan] = ((b[nan] >> np.uint32(16)) | np.uint32(0x0040)).astype(np.uint16)
    return out.reshape(x.shape)


def bf16_bits_to_f32(u16: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns (uint16 or int16 array) -> float32 (exact)."""
    u = np.asarray(u16)
    if u.dtype == np.int16:
        u = u.view(np.uint16)
    if u.dtype != np.uint16:
        raise FormatError(f"bf16_bits_to_f32 expects uint16 bit patterns, got {u.dtype}")
    out = u.astype(np.uint32)
    out <<= np.uint32(16)  # in place: one array, not two
    return out.view(np.float32)


#: exponent field of the 16-bit float types, by name
HALF_EXPONENT = {"bf16": 0x7F80, "f16": 0x7C00}


def half_bits_finite(bits: np.ndarray, dtype: str) -> bool:
    """True when no bf16 / f16 bit pattern in ``bits`` (uint16) is Inf or NaN (exponent field all
    ones), in two read-only passes without temporaries: a non-finite positive value is at least
    the exponent mask read as int16, a non-finite negative one at least mask | 0x8000 read as
    uint16, and every finite value is below both."""
    exp = HALF_EXPONENT[dtype]
    u = np.asarray(bits)
    if u.dtype != np.uint16:
        raise FormatError(f"half_bits_finite expects uint16 bit patterns, got {u.dtype}")
    if not u.size:
        return True
    if u.flags.c_contiguous:
        from . import kernel

        if kernel.available():  # the same test in one compiled pass (a base's copied tensors: GBs)
            return not kernel.half_nonfinite(u, exp)
    return _half_bits_finite_numpy(u, exp)


def _half_bits_finite_numpy(u: np.ndarray, exp: int) -> bool:
    return int(u.max()) < (exp | 0x8000) and int(u.view(np.int16).max()) < exp


def round_to_bf16(x: np.ndarray) -> np.ndarray:
    """float32 values rounded to the nearest bfloat16 (RNE), returned as float32."""
    return bf16_bits_to_f32(f32_to_bf16_bits(x))


def bf16_round_into(acc: np.ndarray, tmp: np.ndarray, out: np.ndarray) -> None:
    """float32 bit patterns (uint32) -> bf16 bit patterns in ``out`` (uint16), round to nearest
    even, for finite values (the caller checks): the fast path of :func:`f32_to_bf16_bits`
    with caller-owned buffers (``tmp`` has ``acc``'s shape)."""
    np.right_shift(acc, 16, out=tmp)
    np.bitwise_and(tmp, 1, out=tmp)
    np.add(tmp, 0x7FFF, out=tmp)
    np.add(tmp, acc, out=tmp)
    np.right_shift(tmp, 16, out=tmp)
    np.copyto(out, tmp, casting="unsafe")


def _f64_to_f32_odd(x: np.ndarray) -> np.ndarray:
    """float64 -> float32 rounded to odd (truncate toward zero, then set the last bit if the
    value was inexact), as uint32 bit patterns. Rounding to odd with 24 bits and then to nearest
    with 8 (or 11) gives the correctly rounded result: no double-rounding error (Boldo and
    Melquiond, "When double rounding is odd", 2005)."""
    with np.errstate(over="ignore", invalid="ignore"):
        t = x.astype(np.float32)
    bits = t.view(np.uint32).copy()
    back = t.astype(np.float64)
    finite_in = np.isfinite(x)
    inexact = finite_in & (back != x)
    over = inexact & ~np.isfinite(t)  # past float32's range: the largest finite float32, odd
    bits[over] = (bits[over] & np.uint32(0x80000000)) | np.uint32(0x7F7FFFFF)
    fix = inexact & ~over & ((bits & np.uint32(1)) == 0)
    if fix.any():
        away = np.abs(back) > np.abs(x)  # rounded away from zero: step back toward zero
        bits[fix & away] -= np.uint32(1)
        bits[fix & ~away] += np.uint32(1)
    return bits


def f64_to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """float64 -> bfloat16 bit patterns (uint16), rounded once to nearest even (a float64 ->
    float32 -> bf16 conversion rounds twice and is wrong when the float32 value lands on a bf16
    tie). Overflow rounds to +-Inf, NaN stays NaN (quiet)."""
    x = np.asarray(x, dtype=np.float64)
    odd = _f64_to_f32_odd(x)
    return f32_to_bf16_bits(odd.view(np.float32))


def f64_to_f16_bits(x: np.ndarray) -> np.ndarray:
    """float64 -> IEEE half bit patterns (uint16), rounded once to nearest even. numpy converts
    float64 to float16 directly (not through float32); tests/test_numerics.py holds it to that
    on double-rounding cases."""
    with np.errstate(over="ignore"):
        return np.asarray(x, dtype=np.float64).astype(np.float16).view(np.uint16)


def round_f64(x: np.ndarray, dtype: str) -> np.ndarray:
    """float64 values rounded once (nearest even) to ``dtype``: "bf16" and "f16" as uint16 bit
    patterns, "f32" as float32."""
    if dtype == "bf16":
        return f64_to_bf16_bits(x)
    if dtype == "f16":
        return f64_to_f16_bits(x)
    if dtype == "f32":
        with np.errstate(over="ignore"):
            return np.asarray(x, dtype=np.float64).astype(np.float32)
    raise FormatError(f"round_f64: unknown output type {dtype!r} (bf16, f16 or f32)")


# --------------------------------------------------------------------------------------------
# MXFP4 (OCP MX, as transformers' MXFP4 checkpoints store MoE experts)
# --------------------------------------------------------------------------------------------

#: FP4 E2M1 value of each 4-bit code (bit 3 = sign, bits 2..1 = exponent, bit 0 = mantissa).
FP4_E2M1_VALUES = np.array(
    [+0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0],
    dtype=np.float32,
)
#: E8M0 exponent bias: scale byte s means 2**(s - 127); 0xFF is NaN in the OCP spec.
E8M0_BIAS = 127
#: Values per MXFP4 block (one shared scale).
MXFP4_BLOCK = 32

# float32 bit pairs (value of the low nibble, value of the high nibble) of every byte, as uint64.
_FP4_PAIR_BITS = np.stack(
    [FP4_E2M1_VALUES[np.arange(256) & 15], FP4_E2M1_VALUES[np.arange(256) >> 4]], axis=1
).astype(np.float32).view(np.uint64).reshape(256)

# Decision midpoints between consecutive non-negative FP4 magnitudes (codes 0..7).
_FP4_MIDPOINTS = np.array([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0], dtype=np.float32)


def e8m0_to_f32(scales: np.ndarray, *, name: str | None = None) -> np.ndarray:
    """E8M0 scale bytes -> float32 2**(s-127), exactly (s=0 gives the subnormal 2**-127).

    Raises FormatError for 0xFF, which the OCP MX spec reserves for NaN.
    """
    s = np.asarray(scales)
    if s.dtype != np.uint8:
        raise FormatError(f"MXFP4 scales{_where(name)} must be uint8 E8M0 bytes, got {s.dtype}")
    if s.size and int(s.max()) == 0xFF:
        raise FormatError(
            f"MXFP4 scale byte 0xFF (NaN in the OCP MX spec){_where(name)}: "
            "the checkpoint is corrupt or not MXFP4; re-download it"
        )
    s32 = s.astype(np.uint32)
    bits = np.where(s32 == 0, np.uint32(0x00400000), s32 << np.uint32(23))
    return bits.view(np.float32)


def _check_mxfp4(blocks: np.ndarray, scales: np.ndarray, name: str | None) -> None:
    if blocks.dtype != np.uint8:
        raise FormatError(f"MXFP4 blocks{_where(name)} must be uint8, got {blocks.dtype}")
    if blocks.ndim < 2 or blocks.shape[-1] != MXFP4_BLOCK // 2:
        raise FormatError(
            f"MXFP4 blocks{_where(name)} must have shape [..., G, 16], got {blocks.shape}"
        )
    if tuple(scales.shape) != tuple(blocks.shape[:-1]):
        raise FormatError(
            f"MXFP4 scales{_where(name)} have shape {tuple(scales.shape)}, expected "
            f"{tuple(blocks.shape[:-1])} (one scale per 16-byte block); the blocks/scales pair "
            "does not belong together"
        )


def decode_mxfp4(blocks: np.ndarray, scales: np.ndarray, *, name: str | None = None) -> np.ndarray:
    """Decode MXFP4 ``blocks`` uint8 [..., G, 16] + ``scales`` uint8 [..., G] -> float32 [..., G*32].

    Block g of a row holds 32 FP4 E2M1 codes, two per byte, low nibble first (byte i: element
    2i in bits 0..3, element 2i+1 in bits 4..7); every value is ``FP4_E2M1_VALUES[code] *
    2**(scale - 127)``. Products are exact in float32 (and in bfloat16), except that values past
    float32's range become +-Inf, as transformers' ``ldexp`` decoding gives; decoding to
    float32 and rounding to bf16 therefore equals transformers' bf16 dequantization.
    The row layout is kept as stored: see :func:`decode_mxfp4_expert` for the expert tensors.
    """
    blocks = np.asarray(blocks)
    scales = np.asarray(scales)
    _check_mxfp4(blocks, scales, name)
    *lead, g, _ = blocks.shape
    n_blk = int(np.prod(lead, dtype=np.int64)) * g
    b2 = np.ascontiguousarray(blocks).reshape(n_blk, 16)
    s1 = np.ascontiguousarray(scales).reshape(n_blk)
    sf = e8m0_to_f32(s1, name=name)  # also refuses 0xFF
    # one gather per byte: a 256-entry table of (low-nibble value, high-nibble value) pairs
    out = np.empty((n_blk, 16), dtype=np.uint64)
    step = 2048  # blocks per chunk: 256 KiB of output stays in cache for the scaling
    with np.errstate(over="ignore"):
        for i in range(0, n_blk, step):
            o = out[i:i + step]
            np.take(_FP4_PAIR_BITS, b2[i:i + step], out=o)
            o.view(np.float32).reshape(-1, MXFP4_BLOCK)[...] *= sf[i:i + step, None]
    return out.view(np.float32).reshape(*lead, g * MXFP4_BLOCK)


def transpose_last2(a: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """Contiguous copy of ``a`` with its last two axes swapped, by cache-sized tiles.

    Several times faster than ``np.ascontiguousarray(np.swapaxes(a, -1, -2))`` on large
    matrices (numpy's strided copy misses the cache on every element).
    """
    a = np.asarray(a)
    if a.ndim < 2:
        raise FormatError(f"transpose_last2 needs at least 2 axes, got shape {a.shape}")
    *lead, r, c = a.shape
    if out is None:
        out = np.empty((*lead, c, r), dtype=a.dtype)
    a3 = a.reshape(-1, r, c)
    o3 = out.reshape(-1, c, r)
    for k in range(a3.shape[0]):
        for i in range(0, r, _TILE):
            for j in range(0, c, _TILE):
                o3[k, j:j + _TILE, i:i + _TILE] = a3[k, i:i + _TILE, j:j + _TILE].T
    return out


def decode_mxfp4_expert(
    blocks: np.ndarray,
    scales: np.ndarray,
    *,
    experts: int | slice | None = None,
    name: str | None = None,
) -> np.ndarray:
    """Decode an MXFP4 expert tensor into the BF16 checkpoint's layout (float32).

    The official checkpoints store each expert matrix row-major over *output* features:
    ``gate_up_proj_blocks`` (E, 2I, H/32, 16) decodes to (E, 2I, H) and ``down_proj_blocks``
    (E, H, I/32, 16) to (E, H, I). The BF16 checkpoints (and transformers' expert modules)
    hold the transpose of each expert: ``gate_up_proj`` (E, H, 2I) and ``down_proj`` (E, I, H).
    This returns that transposed, contiguous layout, i.e. exactly the values of the published
    BF16 copies (transformers' ``convert_moe_packed_tensors`` does the same transpose).

    ``experts`` selects one expert (int, result (rows, cols)) or a slice of them, to bound
    memory; decoding goes one expert at a time, so the peak is the result plus one expert.

    For GGUF, which stores each expert as (out, in) rows like the MXFP4 checkpoint does, use
    :func:`decode_mxfp4` on ``blocks[e]`` directly and skip this transpose (and the converter's
    transpose back).
    """
    blocks = np.asarray(blocks)
    scales = np.asarray(scales)
    _check_mxfp4(blocks, scales, name)
    if blocks.ndim != 4:
        raise FormatError(
            f"MXFP4 expert blocks{_where(name)} must have shape (E, rows, G, 16), got {blocks.shape}"
        )
    if isinstance(experts, (int, np.integer)):
        return transpose_last2(decode_mxfp4(blocks[experts], scales[experts], name=name))
    if experts is not None:
        blocks = blocks[experts]
        scales = scales[experts]
    e, rows, g, _ = blocks.shape
    out = np.empty((e, g * MXFP4_BLOCK, rows), dtype=np.float32)
    for k in range(e):
        transpose_last2(decode_mxfp4(blocks[k], scales[k], name=name), out=out[k])
    return out


def encode_mxfp4(x: np.ndarray, *, name: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Encode float32 [..., K] (K a multiple of 32) as MXFP4 ``(blocks [..., K/32, 16], scales [..., K/32])``.

    For fixtures. Shared exponent per 32-block as in the OCP MX spec:
    ``e = floor(log2(max|x|)) - 2`` (the largest E2M1 exponent), clamped to [-127, 127]; an
    all-zero block gets scale 0. Each value is then rounded to the nearest E2M1 value
    (ties to the even code, magnitudes above 6 saturate to 6); the sign of negative values
    (and -0.0) is kept. ``decode_mxfp4(*encode_mxfp4(x)) == x`` for data already on the grid.
    """
    x = np.asarray(x)
    if x.dtype != np.float32:
        raise FormatError(f"encode_mxfp4 expects float32{_where(name)}, got {x.dtype}")
    if x.ndim < 1 or x.shape[-1] % MXFP4_BLOCK:
        raise FormatError(
            f"encode_mxfp4{_where(name)}: last axis {x.shape[-1:]} is not a multiple of 32"
        )
    if not np.all(np.isfinite(x)):
        raise FormatError(f"encode_mxfp4{_where(name)}: data contains NaN or Inf")
    lead = x.shape[:-1]
    g = x.shape[-1] // MXFP4_BLOCK
    xb = np.ascontiguousarray(x).reshape(-1, MXFP4_BLOCK)
    n_blk = xb.shape[0]
    blocks = np.empty((n_blk, 16), dtype=np.uint8)
    scales = np.empty(n_blk, dtype=np.uint8)
    step = max(1, _CHUNK // 32)
    for i in range(0, n_blk, step):
        v = xb[i:i + step]
        m = np.abs(v).max(axis=1)
        _, p = np.frexp(m)  # m = f * 2**p, f in [0.5, 1): floor(log2 m) = p - 1 (exact)
        e = np.where(m > 0, p.astype(np.int32) - 1 - 2, -E8M0_BIAS)
        e = np.clip(e, -E8M0_BIAS, E8M0_BIAS)
        y = np.abs(np.ldexp(v, (-e)[:, None]).astype(np.float32))
        code = np.searchsorted(_FP4_MIDPOINTS, y, side="left").astype(np.uint8)
        # an exact midpoint between codes k and k+1 went to k; ties go to the even code
        tie = (code < 7) & (y == _FP4_MIDPOINTS[np.minimum(code, 6)]) & ((code & 1) == 1)
        code = code + tie.astype(np.uint8)
        code |= np.signbit(v).astype(np.uint8) << np.uint8(3)
        blocks[i:i + step] = code[:, 0::2] | (code[:, 1::2] << np.uint8(4))
        scales[i:i + step] = (e + E8M0_BIAS).astype(np.uint8)
    return blocks.reshape(*lead, g, 16), scales.reshape(*lead, g)


def mxfp4_hf_to_ggml(blocks: np.ndarray, scales: np.ndarray, *, name: str | None = None) -> np.ndarray:
    """Repack HF MXFP4 (blocks [..., G, 16], scales [..., G]) into ggml ``block_mxfp4`` bytes [..., G*17].

    Lossless: only bits move. Each ggml block (``gguf.GGMLQuantizationType.MXFP4``, 32 values,
    17 bytes) is the E8M0 scale byte followed by 16 code bytes where byte j holds element j in
    its low nibble and element j+16 in its high nibble (HF: byte i holds elements 2i, 2i+1).
    The 4-bit codes themselves are the same E2M1 codes on both sides (ggml doubles its value
    table and halves the scale, giving the same numbers).

    The leading axes are kept: for ``gate_up_proj_blocks`` (E, 2I, H/32, 16) the result
    is (E, 2I, H/32*17), whose rows 0::2 / 1::2 are the gate / up experts as llama.cpp splits them.
    """
    blocks = np.asarray(blocks)
    scales = np.asarray(scales)
    _check_mxfp4(blocks, scales, name)
    if scales.dtype != np.uint8:
        raise FormatError(f"MXFP4 scales{_where(name)} must be uint8 E8M0 bytes, got {scales.dtype}")
    *lead, g, _ = blocks.shape
    n_blk = int(np.prod(lead, dtype=np.int64)) * g
    b2 = np.ascontiguousarray(blocks).reshape(n_blk, 16)
    out = np.empty((n_blk, 17), dtype=np.uint8)
    out[:, 0] = np.ascontiguousarray(scales).reshape(n_blk)
    # ggml byte 2m   = element 2m   | element 2m+16 << 4 = (hf[m] & 0x0F) | (hf[8+m] & 0x0F) << 4
    # ggml byte 2m+1 = element 2m+1 | element 2m+17 << 4 = (hf[m] >> 4)   | (hf[8+m] & 0xF0)
    step = 1 << 14
    if sys.byteorder == "little":
        # the same on 8 bytes at a time: hf[0:8] and hf[8:16] as two uint64 words, then the
        # even and odd result bytes interleaved by spreading each byte k to byte 2k
        w = b2.view(np.uint64)
        res = np.empty((min(step, n_blk), 2), dtype=np.uint64)
        for i in range(0, n_blk, step):
            a, c = w[i:i + step, 0], w[i:i + step, 1]
            r = res[: a.shape[0]]
            even = (a & _M0F) | ((c & _M0F) << np.uint64(4))
            odd = ((a >> np.uint64(4)) & _M0F) | (c & _MF0)
            r[:, 0] = _spread_bytes(even & _M32) | (_spread_bytes(odd & _M32) << np.uint64(8))
            r[:, 1] = _spread_bytes(even >> np.uint64(32)) | (_spread_bytes(odd >> np.uint64(32)) << np.uint64(8))
            out[i:i + step, 1:] = r.view(np.uint8).reshape(-1, 16)
    else:
        for i in range(0, n_blk, step):
            a, c = b2[i:i + step, :8], b2[i:i + step, 8:]
            o = out[i:i + step]
            o[:, 1::2] = (a & np.uint8(0x0F)) | (c << np.uint8(4))
            o[:, 2::2] = (a >> np.uint8(4)) | (c & np.uint8(0xF0))
    return out.reshape(*lead, g * 17)


_M0F = np.uint64(0x0F0F0F0F0F0F0F0F)
_MF0 = np.uint64(0xF0F0F0F0F0F0F0F0)
_M32 = np.uint64(0xFFFFFFFF)


def _spread_bytes(x: np.ndarray) -> np.ndarray:
    """uint64 words holding 4 bytes in their low half -> byte k moved to byte 2k (others 0)."""
    x = (x | (x << np.uint64(16))) & np.uint64(0x0000FFFF0000FFFF)
    return (x | (x << np.uint64(8))) & np.uint64(0x00FF00FF00FF00FF)


# --------------------------------------------------------------------------------------------
# bitsandbytes 4-bit (NF4 / FP4) and 8-bit (LLM.int8)
# --------------------------------------------------------------------------------------------

#: bitsandbytes' NF4 code table (``get_4bit_type("nf4")``), index = 4-bit code.
NF4_CODE = np.array(
    [
        -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
        -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
        0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
        0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
    ],
    dtype=np.float32,
)

#: bitsandbytes' FP4 code table (``get_4bit_type("fp4")``): its own E2M1 variant
#: (bias 2, code 1 is the subnormal 0.0625) in bit-pattern order, divided by its max (12).
BNB_FP4_CODE = (
    np.array(
        [0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0, -0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0],
        dtype=np.float32,
    )
    / np.float32(12.0)
).astype(np.float32)

_BNB_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
_BNB_DTYPES = ("float32", "float16", "bfloat16")
#: Block size bitsandbytes uses for the nested (double) quantization of absmax.
BNB_NESTED_BLOCKSIZE = 256


def bnb_4bit_code(quant_type: str) -> np.ndarray:
    """The 16-entry code table of a bitsandbytes 4-bit ``quant_type`` ("nf4" or "fp4")."""
    if quant_type == "nf4":
        return NF4_CODE.copy()
    if quant_type == "fp4":
        return BNB_FP4_CODE.copy()
    raise UnsupportedError(
        f"bitsandbytes 4-bit quant_type '{quant_type}' is not supported; only 'nf4' and 'fp4' exist"
    )


def _torch_linspace_f32(start: float, end: float, steps: int) -> np.ndarray:
    # torch's CPU linspace in float32: step = (end - start) / (steps - 1) in float32; the first
    # half is start + step * i and the second half end - step * (steps - 1 - i), each a fused
    # multiply-add (one rounding; emulated here in float64, where the product is exact).
    start32, end32 = np.float32(start), np.float32(end)
    step = np.float64((end32 - start32) / np.float32(steps - 1))
    idx = np.arange(steps, dtype=np.float64)
    half = steps // 2
    up = np.float64(start32) + step * idx[:half]
    down = np.float64(end32) - step * (steps - 1 - idx[half:])
    return np.concatenate([up, down]).astype(np.float32)


def bnb_dynamic_map(signed: bool = True, max_exponent_bits: int = 7, total_bits: int = 8) -> np.ndarray:
    """bitsandbytes' "dynamic" 8-bit code (``create_dynamic_map``), float32[256], sorted.

    It is the default code of ``quantize_blockwise`` and so the ``nested_quant_map`` of every
    double-quantized 4-bit weight. Only needed to make fixtures: decoding reads the map saved
    in the checkpoint.
    """
    data: list[float] = []
    non_sign_bits = total_bits - 1
    additional_items = 2 ** (non_sign_bits - max_exponent_bits) - 1
    i = 0
    for i in range(max_exponent_bits):
        n = int(2 ** (i + non_sign_bits - max_exponent_bits) + 1 if signed
                else 2 ** (i + non_sign_bits - max_exponent_bits + 1) + 1)
        bounds = _torch_linspace_f32(0.1, 1.0, n)
        means = (bounds[:-1] + bounds[1:]) / np.float32(2.0)
        scale = np.float32(10 ** (-(max_exponent_bits - 1) + i))
        data += (scale * means).astype(np.float32).tolist()
        if signed:
            data += (-scale * means).astype(np.float32).tolist()
    if additional_items > 0:
        bounds = _torch_linspace_f32(0.1, 1.0, additional_items + 1)
        means = (bounds[:-1] + bounds[1:]) / np.float32(2.0)
        scale = np.float32(10 ** (-(max_exponent_bits - 1) + i))
        data += (scale * means).astype(np.float32).tolist()
        if signed:
            data += (-scale * means).astype(np.float32).tolist()
    data.append(0.0)
    data.append(1.0)
    data += [0.0] * (2 ** total_bits - len(data))
    data.sort()
    return np.array(data, dtype=np.float32)


class NestedAbsmax(NamedTuple):
    """Nested (double) quantization of a bitsandbytes 4-bit weight's absmax."""

    absmax: np.ndarray  # float32 [n_nested_blocks]: absmax of each nested block
    quant_map: np.ndarray  # float32 [256]: the 8-bit code (bitsandbytes' dynamic map)
    blocksize: int  # values of the absmax vector per nested block (256)
    offset: float  # mean that was subtracted before quantizing (added back)


def _blockwise_scale(vals: np.ndarray, absmax: np.ndarray, blocksize: int, n: int) -> np.ndarray:
    """vals[k] * absmax[k // blocksize] in float32, for the first n values (last block may be partial)."""
    out = np.empty(n, dtype=np.float32)
    full = (n // blocksize) * blocksize
    if full:
        out[:full] = (vals[:full].reshape(-1, blocksize) * absmax[: full // blocksize, None]).reshape(-1)
    if n > full:
        out[full:] = vals[full:n] * absmax[full // blocksize]
    return out


def decode_bnb_nested_absmax(qabsmax: np.ndarray, nested: NestedAbsmax, *, name: str | None = None) -> np.ndarray:
    """absmax of a double-quantized 4-bit weight: ``quant_map[q] * nested_absmax[block] + offset`` (float32).

    Same arithmetic as bitsandbytes' ``dequantize_blockwise`` (code lookup times absmax of each
    nested block, in float32) followed by ``absmax += offset`` in float32.
    """
    q = np.asarray(qabsmax)
    if q.dtype != np.uint8:
        raise FormatError(f"nested-quantized absmax{_where(name)} must be uint8 codes, got {q.dtype}")
    qmap = np.asarray(nested.quant_map, dtype=np.float32).reshape(-1)
    if qmap.size != 256:
        raise FormatError(f"nested_quant_map{_where(name)} must have 256 entries, got {qmap.size}")
    bs = int(nested.blocksize)
    n = q.size
    nabs = np.asarray(nested.absmax, dtype=np.float32).reshape(-1)
    if bs <= 0 or nabs.size != -(-n // bs):
        raise FormatError(
            f"nested_absmax{_where(name)} has {nabs.size} entries, expected {-(-n // max(bs, 1))} "
            f"for {n} absmax codes in blocks of {bs}"
        )
    out = _blockwise_scale(qmap[q.reshape(-1)], nabs, bs, n)
    out += np.float32(nested.offset)
    return out


def _round_to_dtype(x: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "float32":
        return x
    if dtype == "bfloat16":
        return round_to_bf16(x)
    if dtype == "float16":
        return x.astype(np.float16).astype(np.float32)
    raise UnsupportedError(f"bitsandbytes weight dtype '{dtype}' is not supported; expected one of {_BNB_DTYPES}")


def decode_bnb_4bit(
    packed: np.ndarray,
    absmax: np.ndarray,
    *,
    quant_map: np.ndarray,
    blocksize: int,
    shape: tuple[int, ...],
    dtype: str = "float32",
    nested: NestedAbsmax | tuple | None = None,
    name: str | None = None,
) -> np.ndarray:
    """Decode a bitsandbytes 4-bit weight (NF4 or FP4) with numpy: float32 array of ``shape``.

    ``packed`` holds two 4-bit codes per byte, the *high* nibble first (element 2k in bits 4..7,
    element 2k+1 in bits 0..3), over the row-major flattened weight (bitsandbytes stores it as
    uint8 [ceil(n/2), 1]). Value = ``quant_map[code] * absmax[k // blocksize]`` in float32; the
    last block may be partial. With ``nested`` (double quantization), ``absmax`` is uint8 codes
    decoded by :func:`decode_bnb_nested_absmax`. Finally the values are rounded to ``dtype``
    ("bfloat16", "float16" or "float32": the dtype bitsandbytes dequantizes to, as its
    ``dequantize_4bit`` does) and returned as float32.
    """
    p = np.asarray(packed)
    if p.dtype != np.uint8:
        # bnb_4bit_quant_storage other than uint8 stores the same bytes under another dtype
        p = np.ascontiguousarray(p).view(np.uint8)
    shape = tuple(int(d) for d in shape)
    n = int(np.prod(shape, dtype=np.int64))
    if int(blocksize) not in _BNB_BLOCKSIZES:
        raise FormatError(f"bitsandbytes blocksize {blocksize}{_where(name)} is invalid; expected one of {_BNB_BLOCKSIZES}")
    blocksize = int(blocksize)
    if p.size != (n + 1) // 2:
        raise FormatError(
            f"bitsandbytes 4-bit weight{_where(name)} has {p.size} bytes, expected {(n + 1) // 2} "
            f"for shape {shape}; the quant_state does not match the weight"
        )
    qmap = np.asarray(quant_map, dtype=np.float32).reshape(-1)
    if qmap.size != 16:
        raise FormatError(f"bitsandbytes quant_map{_where(name)} must have 16 entries, got {qmap.size}")
    if nested is not None:
        nested = NestedAbsmax(*nested)
        am = decode_bnb_nested_absmax(absmax, nested, name=name)
    else:
        am = np.asarray(absmax)
        if am.dtype != np.float32:
            raise FormatError(
                f"bitsandbytes absmax{_where(name)} is {am.dtype} but no nested quant state was given; "
                "a uint8 absmax needs nested_absmax / nested_quant_map"
            )
        am = am.reshape(-1)
    n_blocks = -(-n // blocksize)
    if am.size != n_blocks:
        raise FormatError(
            f"bitsandbytes absmax{_where(name)} has {am.size} entries, expected {n_blocks} "
            f"for {n} values in blocks of {blocksize}"
        )
    flat = p.reshape(-1)
    # one gather per byte: (value of the high nibble, value of the low nibble) as a float32 pair
    pair = np.stack([qmap[np.arange(256) >> 4], qmap[np.arange(256) & 15]], axis=1)
    pair_bits = np.ascontiguousarray(pair, dtype=np.float32).view(np.uint64).reshape(256)
    out = np.empty(2 * flat.size, dtype=np.float32)
    o64 = out.view(np.uint64)
    half = blocksize // 2  # bytes per block (blocksize is even)
    n_full = n // blocksize
    step = max(1, (1 << 15) // half)  # whole blocks per chunk (~128 KiB of output)
    for i in range(0, n_full, step):
        j = min(n_full, i + step)
        np.take(pair_bits, flat[i * half: j * half], out=o64[i * half: j * half])
        out[i * blocksize: j * blocksize].reshape(-1, blocksize)[...] *= am[i:j, None]
    if n > n_full * blocksize:  # a partial last block
        k = n_full * half
        np.take(pair_bits, flat[k:], out=o64[k:])
        out[n_full * blocksize:] *= am[n_full]
    return _round_to_dtype(out[:n], dtype).reshape(shape)


def _weight_prefix(prefix: str) -> str:
    return prefix if prefix == "weight" or prefix.endswith(".weight") else prefix + ".weight"


def parse_bnb_quant_state(tensors: Mapping[str, np.ndarray], prefix: str) -> dict:
    """Read a bitsandbytes ``Params4bit`` as it is serialised in a state dict.

    ``prefix`` is the module (``model.layers.0.self_attn.q_proj``) or its weight
    (``...q_proj.weight``). Keys read: ``{w}`` (uint8 packed), ``{w}.absmax``, ``{w}.quant_map``,
    ``{w}.quant_state.bitsandbytes__nf4`` (or ``__fp4``: uint8 bytes of a JSON object with
    quant_type, blocksize, dtype, shape and, when nested, nested_blocksize, nested_dtype,
    nested_offset), and when nested ``{w}.nested_absmax``, ``{w}.nested_quant_map``.

    Returns a dict with the keyword arguments of :func:`decode_bnb_4bit` (``packed``, ``absmax``,
    ``quant_map``, ``blocksize``, ``shape``, ``dtype``, ``nested``) plus ``quant_type``.
    """
    w = _weight_prefix(prefix)
    if w not in tensors:
        raise FormatError(f"bitsandbytes weight '{w}' is missing from the state dict")
    qs_keys = [k for k in tensors if k.startswith(w + ".quant_state.bitsandbytes__")]
    if len(qs_keys) != 1:
        raise FormatError(
            f"bitsandbytes weight '{w}' needs exactly one '{w}.quant_state.bitsandbytes__nf4|fp4' "
            f"entry, found {len(qs_keys)}; the checkpoint was not saved by bitsandbytes 4-bit"
        )
    qs_key = qs_keys[0]
    raw = np.asarray(tensors[qs_key])
    try:
        meta = json.loads(raw.astype(np.uint8).tobytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FormatError(f"'{qs_key}' does not hold bitsandbytes' JSON quant state: {exc}") from None
    quant_type = meta.get("quant_type", qs_key.rsplit("__", 1)[1])
    if quant_type not in ("nf4", "fp4"):
        raise UnsupportedError(f"'{qs_key}': bitsandbytes quant_type '{quant_type}' is not supported (nf4, fp4 are)")
    for k in ("blocksize", "dtype", "shape"):
        if k not in meta:
            raise FormatError(f"'{qs_key}' lacks '{k}'; the quant state is incomplete")
    for k in (w + ".absmax", w + ".quant_map"):
        if k not in tensors:
            raise FormatError(f"bitsandbytes tensor '{k}' is missing from the state dict")
    nested = None
    if "nested_offset" in meta or (w + ".nested_absmax") in tensors:
        for k in (w + ".nested_absmax", w + ".nested_quant_map"):
            if k not in tensors:
                raise FormatError(f"bitsandbytes nested tensor '{k}' is missing from the state dict")
        for k in ("nested_blocksize", "nested_offset"):
            if k not in meta:
                raise FormatError(f"'{qs_key}' lacks '{k}' although the weight is double-quantized")
        nested = NestedAbsmax(
            absmax=np.asarray(tensors[w + ".nested_absmax"], dtype=np.float32),
            quant_map=np.asarray(tensors[w + ".nested_quant_map"], dtype=np.float32),
            blocksize=int(meta["nested_blocksize"]),
            offset=float(meta["nested_offset"]),
        )
    dtype = str(meta["dtype"])
    if dtype not in _BNB_DTYPES:
        raise UnsupportedError(f"'{qs_key}': weight dtype '{dtype}' is not supported; expected one of {_BNB_DTYPES}")
    return {
        "packed": tensors[w],
        "absmax": tensors[w + ".absmax"],
        "quant_map": np.asarray(tensors[w + ".quant_map"], dtype=np.float32),
        "quant_type": quant_type,
        "blocksize": int(meta["blocksize"]),
        "shape": tuple(int(d) for d in meta["shape"]),
        "dtype": dtype,
        "nested": nested,
    }


def decode_bnb_4bit_state(tensors: Mapping[str, np.ndarray], prefix: str) -> np.ndarray:
    """:func:`parse_bnb_quant_state` then :func:`decode_bnb_4bit`: the weight as float32."""
    st = parse_bnb_quant_state(tensors, prefix)
    quant_type = st.pop("quant_type")
    # bitsandbytes' dequantize kernels decode NF4 and FP4 from their own tables, not from the saved
    # quant_map; the two differ in one bit: FP4's code 8 is -0.0 (sign bit set), saved as +0.0
    table = bnb_4bit_code(quant_type)
    if st["quant_map"].shape != table.shape or not np.array_equal(st["quant_map"], table):
        raise FormatError(f"bitsandbytes tensor '{_weight_prefix(prefix)}.quant_map' is not the {quant_type} table "
                          "bitsandbytes decodes with; the checkpoint is damaged or was not written by bitsandbytes")
    st["quant_map"] = table
    return decode_bnb_4bit(name=_weight_prefix(prefix), **st)


def _bnb_blockwise_quantize(a: np.ndarray, code: np.ndarray, blocksize: int) -> tuple[np.ndarray, np.ndarray]:
    """bitsandbytes' blockwise absmax quantization (float32): codes (index into sorted ``code``), absmax."""
    n = a.size
    n_blocks = -(-n // blocksize)
    pad = np.zeros(n_blocks * blocksize, dtype=np.float32)
    pad[:n] = a
    absmax = np.abs(pad.reshape(n_blocks, blocksize)).max(axis=1).astype(np.float32)
    recip = (np.float32(1.0) / np.maximum(absmax, np.float32(1e-38))).astype(np.float32)
    scaled = np.clip(pad.reshape(n_blocks, blocksize) * recip[:, None], -1, 1).reshape(-1)[:n]
    bounds = (code[:-1] + code[1:]) / np.float32(2.0)
    q = np.searchsorted(bounds, scaled, side="left")
    return q, absmax


def encode_bnb_4bit(
    x: np.ndarray,
    quant_type: str = "nf4",
    blocksize: int = 64,
    nested: bool = False,
    *,
    prefix: str = "weight",
    dtype: str = "bfloat16",
) -> dict[str, np.ndarray]:
    """Quantize ``x`` as bitsandbytes ``quantize_4bit`` does; return the tensors it would save.

    For fixtures. Keys (with ``w = prefix``, e.g. ``model.layers.0.self_attn.q_proj.weight``):
    ``w`` uint8 [ceil(n/2), 1], ``w.absmax`` (float32, or uint8 when nested), ``w.quant_map``
    float32[16], and when nested ``w.nested_absmax`` float32, ``w.nested_quant_map`` float32[256];
    plus ``w.quant_state.bitsandbytes__{quant_type}``: uint8 bytes of the JSON quant state.
    ``dtype`` names the original weight dtype recorded in the quant state.
    Nested quantization subtracts the mean of absmax and quantizes the rest with the dynamic
    8-bit map in blocks of 256, as bitsandbytes does.
    """
    code = bnb_4bit_code(quant_type)
    if blocksize not in _BNB_BLOCKSIZES:
        raise UnsupportedError(f"bitsandbytes blocksize {blocksize} is invalid; expected one of {_BNB_BLOCKSIZES}")
    if dtype not in _BNB_DTYPES:
        raise UnsupportedError(f"bitsandbytes dtype '{dtype}' is not supported; expected one of {_BNB_DTYPES}")
    x = np.asarray(x)
    shape = tuple(int(d) for d in x.shape)
    a = np.ascontiguousarray(x, dtype=np.float32).reshape(-1)
    order = np.argsort(code, kind="stable")
    q_sorted, absmax = _bnb_blockwise_quantize(a, code[order], blocksize)
    if q_sorted.size % 2:  # bitsandbytes pads the scaled values with 0.0 to a whole byte
        q_zero = np.searchsorted((code[order][:-1] + code[order][1:]) / np.float32(2.0), np.float32(0.0))
        q_sorted = np.concatenate([q_sorted, [q_zero]])
    q = order[q_sorted].astype(np.uint8)
    packed = ((q[0::2] << np.uint8(4)) | q[1::2]).reshape(-1, 1)
    w = prefix
    out: dict[str, np.ndarray] = {w: packed}
    meta: dict = {"quant_type": quant_type, "blocksize": blocksize, "dtype": dtype, "shape": list(shape)}
    if nested:
        offset = np.float32(absmax.astype(np.float64).mean())  # the mean, rounded once
        dmap = bnb_dynamic_map()
        q2, absmax2 = _bnb_blockwise_quantize(absmax - offset, dmap, BNB_NESTED_BLOCKSIZE)
        out[w + ".absmax"] = q2.astype(np.uint8)
        out[w + ".quant_map"] = code + np.float32(0.0)  # saved with +0.0 where the table has -0.0
        out[w + ".nested_absmax"] = absmax2
        out[w + ".nested_quant_map"] = dmap
        meta.update(nested_blocksize=BNB_NESTED_BLOCKSIZE, nested_dtype="float32", nested_offset=float(offset))
    else:
        out[w + ".absmax"] = absmax
        out[w + ".quant_map"] = code + np.float32(0.0)  # saved with +0.0 where the table has -0.0
    blob = json.dumps(meta).encode("utf-8")
    out[f"{w}.quant_state.bitsandbytes__{quant_type}"] = np.frombuffer(blob, dtype=np.uint8).copy()
    return out


def decode_bnb_int8(weight: np.ndarray, scb: np.ndarray, *, name: str | None = None) -> np.ndarray:
    """Decode a bitsandbytes LLM.int8 weight: int8 [out, in] with row scales ``SCB`` float32 [out].

    ``weight * SCB[:, None] / 127``, computed as bitsandbytes' ``int8_vectorwise_dequant`` (and
    transformers' dequantize) do: ``(weight * SCB[:, None]) * float32(1/127)`` in float32.
    """
    w = np.asarray(weight)
    s = np.asarray(scb)
    if w.dtype != np.int8 or w.ndim != 2:
        raise FormatError(f"LLM.int8 weight{_where(name)} must be int8 [out, in], got {w.dtype} {w.shape}")
    if s.shape != (w.shape[0],):
        raise FormatError(
            f"LLM.int8 SCB{_where(name)} has shape {s.shape}, expected ({w.shape[0]},): one scale per output row"
        )
    s = s.astype(np.float32)
    return (w.astype(np.float32) * s[:, None]) * np.float32(7.874015718698502e-3)
