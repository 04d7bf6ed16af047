"""The merge arithmetic (lora2gguf.merge): every element is the exact sum of W and the float64
products, rounded once; checked against exact rational arithmetic, on cases built to sit on
rounding boundaries, and across BLAS thread counts, tile sizes and orientations."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
from threadpoolctl import threadpool_limits

from lora2gguf import merge, numerics


def _round_fraction_bf16(q: Fraction) -> int:
    """bf16 bits of the exact rational q, rounded to nearest even: from the two bf16 neighbours."""
    sign = 0x8000 if q < 0 else 0
    a = abs(q)
    f = np.float32(float(a))  # a float32 near a; step down until it is <= a
    while Fraction(float(f)) > a:
        f = np.nextafter(f, np.float32(0))
    lo = int(np.array([f], np.float32).view(np.uint32)[0]) >> 16
    lo_v = Fraction(float(np.array([lo << 16], np.uint32).view(np.float32)[0]))
    if lo_v == a:
        return sign | lo
    if lo == 0x7F7F:
        hi_v = Fraction(2) ** 128  # the first bf16 step past the largest finite value
    else:
        hi_v = Fraction(float(np.array([(lo + 1) << 16], np.uint32).view(np.float32)[0]))
    d_lo, d_hi = a - lo_v, hi_v - a
    up = d_hi < d_lo or (d_hi == d_lo and lo & 1)
    return sign | (lo + 1 if up else lo)


def _round_fraction(q: Fraction, dtype: str):
    if dtype == "bf16":
        return _round_fraction_bf16(q)
    ft = np.float16 if dtype == "f16" else np.float32
    # candidates around float(q) (float(q) is q rounded to float64 once)
    x = ft(float(q))
    cands = [x, np.nextafter(x, ft(np.inf)), np.nextafter(x, ft(-np.inf))]
    best = min(cands, key=lambda c: (abs(Fraction(float(c)) - q),
                                     int(np.array([c]).view(np.uint16 if ft == np.float16 else np.uint32)[0]) & 1))
    return int(np.array([best]).view(np.uint16 if ft == np.float16 else np.uint32)[0])


def _reference(w, left, right, add, dtype):
    n, m = w.shape
    out = np.empty((n, m), np.int64)
    for i in range(n):
        for j in range(m):
            q = Fraction(float(w[i, j])) + Fraction(float(add))
            for k in range(left.shape[1]):
                q += Fraction(float(left[i, k] * right[k, j]))  # each product rounded to float64
            out[i, j] = _round_fraction(q, dtype)
    return out


def _bits(a: np.ndarray) -> np.ndarray:
    return a.view(np.uint16 if a.dtype.itemsize == 2 else np.uint32).astype(np.int64)


def _run(w, left, right, dtype, add=0.0, **kw):
    out = np.empty(w.shape, np.float32 if dtype == "f32" else np.uint16)
    assert merge.merge_block(w, w.shape, left, right, dtype, out=out, add=add, **kw)
    return out


@pytest.mark.parametrize("dtype", ["bf16", "f16", "f32"])
@pytest.mark.parametrize("k,add", [(0, 0.0), (5, 0.0), (3, 1.0), (17, 0.0)])
def test_equals_exact_rational_sum_rounded_once(dtype, k, add):
    rng = np.random.default_rng(k * 7 + int(add))
    w = (rng.standard_normal((9, 13)) * 0.02).astype(np.float32)
    left = rng.standard_normal((9, k)) * 0.05 * 3.7
    right = rng.standard_normal((k, 13)) * 0.05
    got = _bits(_run(w, left if k else None, right if k else None, dtype, add))
    np.testing.assert_array_equal(got, _reference(w, left, right, add, dtype))


def test_ties_decided_by_the_exact_sum():
    """W sits on a bf16 tie (1 + 2**-8, halfway between 1 and 1 + 2**-7) and the delta is a
    huge cancellation that leaves +-2**-70: a float64 sum in any order loses the 2**-70 and
    rounds the tie to even; the exact sum rounds away from the tie, as its sign says."""
    w = np.full((1, 2), 1 + 2.0 ** -8, np.float32)
    left = np.array([[1.0, 1.0, 1.0]])
    right = np.array([[2.0 ** 60, 2.0 ** 60], [2.0 ** -70, -(2.0 ** -70)], [-(2.0 ** 60), -(2.0 ** 60)]])
    got = _run(w, left, right, "bf16")
    assert got.tolist() == [[0x3F81, 0x3F80]]  # 1 + 2**-7 above the tie, 1.0 below it
    for dtype in ("f16", "f32"):  # 1 + 2**-8 is exact in both: only the sign of the rest moves it
        out = _bits(_run(w, left, right, dtype))
        ref = _reference(w, left, right, 0.0, dtype)
        np.testing.assert_array_equal(out, ref)


def test_near_tie_values_and_double_rounding_case():
    """Values within a few float64 steps of bf16 ties, and a value whose float32 rounding lands
    exactly on a bf16 tie (rounding through float32 would round twice)."""
    ties = np.array([1 + 2.0 ** -8, 3 * (1 + 2.0 ** -8), -(0.75 + 2.0 ** -9), 2.0 ** -100 * (1 + 2.0 ** -8)])
    tiny = np.array([2.0 ** -40, -(2.0 ** -40), 2.0 ** -30, 2.0 ** -60])
    w = np.zeros((len(ties), len(tiny)), np.float32)
    left = np.ones((len(ties), 2))
    right = np.zeros((2, len(tiny)))
    left[:, 0] = ties
    right[0, :] = 1.0
    right[1, :] = tiny
    got = _bits(_run(w, left, right, "bf16"))
    np.testing.assert_array_equal(got, _reference(w, left, right, 0.0, "bf16"))


def test_does_not_depend_on_blas_threads_tiles_or_orientation():
    rng = np.random.default_rng(3)
    n, m, k = 70, 90, 24
    w = (rng.standard_normal((n, m)) * 0.02).astype(np.float32)
    a = (rng.standard_normal((k, m)) * 0.05).astype(np.float32).astype(np.float64)
    bs = (rng.standard_normal((n, k)) * 0.05).astype(np.float32).astype(np.float64) * (16 / np.sqrt(k))
    with threadpool_limits(limits=1, user_api="blas"):
        one = _run(w, bs, a, "bf16")
    with threadpool_limits(limits=2, user_api="blas"):
        two = _run(w, bs, a, "bf16")
    np.testing.assert_array_equal(one, two)
    old = merge.TILE_ELEMENTS
    try:
        merge.TILE_ELEMENTS = 7 * m  # tiles of 7 rows
        assert merge.tile_rows(n, m) == 7
        tiled = _run(w, bs, a, "bf16")
    finally:
        merge.TILE_ELEMENTS = old
    np.testing.assert_array_equal(one, tiled)
    # the transposed block, with the factors' roles swapped: the same products, the same bits
    wt = np.ascontiguousarray(w.T)
    flipped = _run(wt, np.ascontiguousarray(a.T), np.ascontiguousarray(bs.T), "bf16")
    np.testing.assert_array_equal(one, flipped.T)
    # and the tile source form (a function giving rows of W) gives the same bits
    src = _run_source(w, bs, a)
    np.testing.assert_array_equal(one, src)


def _run_source(w, left, right):
    out = np.empty(w.shape, np.uint16)

    def tiles(r0, r1, buf):
        np.copyto(buf, w[r0:r1])
        return buf

    assert merge.merge_block(tiles, w.shape, left, right, "bf16", out=out)
    return out


@pytest.mark.parametrize("poison", ["nan_w", "inf_factor", "overflow"])
def test_non_finite_is_reported(poison):
    w = np.ones((4, 5), np.float32)
    left = np.ones((4, 2))
    right = np.ones((2, 5))
    if poison == "nan_w":
        w[1, 2] = np.nan
    elif poison == "inf_factor":
        right[0, 3] = np.inf
    else:
        left[:] = 1e308
        right[:] = 1e308
    out = np.empty((4, 5), np.uint16)
    assert merge.merge_block(w, w.shape, left, right, "bf16", out=out) is False


def test_exact_round_against_fractions():
    rng = np.random.default_rng(5)
    for _ in range(200):
        vals = list(rng.standard_normal(6) * 10.0 ** rng.integers(-30, 30, 6))
        if rng.random() < 0.5:  # a sum that lands on a boundary of each type, plus a tiny rest
            vals = [1 + 2.0 ** -8, 2.0 ** -11, float(rng.choice([2.0 ** -80, -(2.0 ** -80), 0.0]))]
        q = sum((Fraction(v) for v in vals), Fraction(0))
        for dtype in ("bf16", "f16", "f32"):
            if dtype == "f16" and abs(q) > 6e4:
                continue  # past half's range
            got = merge.exact_round(vals, dtype)
            assert _bits(np.array([got]))[0] == _round_fraction(q, dtype), (vals, dtype)


def test_dora_rows_deterministic_and_bounded():
    """DoRA's per-row scaling: merge_block's result is the fixed-order reference rounded once
    (dora_rows), with any BLAS thread count, and the row norms do not depend on numpy's reductions."""
    rng = np.random.default_rng(9)
    n, m, k = 37, 53, 6
    w = (rng.standard_normal((n, m)) * 0.02).astype(np.float32)
    left, right = rng.standard_normal((n, k)) * 0.1, rng.standard_normal((k, m)) * 0.1
    mag = np.abs(rng.standard_normal(n)) + 0.5
    outs = []
    for threads in (1, 2):
        with threadpool_limits(limits=threads, user_api="blas"):
            outs.append(_run(w, left, right, "bf16", row_scale=mag))
    np.testing.assert_array_equal(outs[0], outs[1])
    want = np.stack([numerics.f64_to_bf16_bits(merge.dora_rows(w[i], 0.0, left[i], right, mag[i])) for i in range(n)])
    np.testing.assert_array_equal(outs[0], want)
    # every row of the result has the magnitude as its norm (to bf16 precision)
    got = numerics.bf16_bits_to_f32(outs[0]).astype(np.float64)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), mag, rtol=1e-2)
    # the fixed tree sums equal exact sums to float64 rounding, and odd widths pad with zeros
    x = rng.standard_normal((4, 13))
    np.testing.assert_allclose(merge.tree_sum_rows(x), [math.fsum(r) for r in x], rtol=1e-14)


def test_dora_zero_norm_is_reported():
    w = np.zeros((2, 3), np.float32)
    out = np.empty((2, 3), np.uint16)
    assert merge.merge_block(w, w.shape, None, None, "bf16", out=out, row_scale=np.ones(2)) is False
