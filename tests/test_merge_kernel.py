"""The compiled merge kernel (_kernels.c through lora2gguf.kernel) against the numpy route:
the same bits on every layout a build reads (bf16 bits or float32, transposed, rows permuted,
columns cut), on values sitting on rounding boundaries, with its candidate list overflowing,
and its own one-rounding float64 -> bf16 against numerics.round_f64 on every kind of value."""

from __future__ import annotations

import numpy as np
import pytest

from lora2gguf import kernel, merge, numerics

from test_merge import _reference


def test_kernel_is_built():
    """setup.sh installs lora2gguf with its compiled kernel; without it builds are ~3x slower."""
    assert kernel.available(), kernel.status()


def _numpy_route(monkeypatch):
    monkeypatch.setattr(kernel, "_lib", None)


def test_bf16_of_rounds_once():
    rng = np.random.default_rng(0)
    x = np.concatenate([
        rng.standard_normal(200_000) * 0.02,
        rng.standard_normal(20_000) * 1e30,
        rng.standard_normal(20_000) * 1e-39,  # bf16 subnormals
        rng.standard_normal(20_000) * 1e-46,  # below the smallest float32 subnormal
        [0.0, -0.0, 3.3895313892515355e38, 3.39e38, 3.3961e38, 3.4e38, 1e300, -1e300, 2.0 ** -149, -(2.0 ** -150),
         2.0 ** -134, 2.0 ** -133 * 1.5],
    ])
    # exact bf16 ties and their float64 neighbours (where rounding through float32 rounds twice)
    ties = (np.arange(1, 4000, dtype=np.uint32) << 16 | 0x8000).view(np.float32).astype(np.float64)
    x = np.concatenate([x, ties, np.nextafter(ties, np.inf), np.nextafter(ties, -np.inf), -ties])
    np.testing.assert_array_equal(kernel.bf16_of(x), numerics.round_f64(x, "bf16"))


def _block(rng, n, m, k, near_ties=True):
    w = (rng.standard_normal((n, m)) * 0.02).astype(np.float32)
    left = (rng.standard_normal((n, k)) * 0.05).astype(np.float32).astype(np.float64) * 2.0
    right = (rng.standard_normal((k, m)) * 0.05).astype(np.float32).astype(np.float64)
    if near_ties and k:
        # rows whose base values are bf16 ties and whose delta is far below a float64 step of
        # them: V is the tie itself, and only the exact sum's sign decides each element
        for i in rng.choice(n, 3, replace=False):
            w[i] = ((w[i].view(np.uint32) & np.uint32(0xFFFF0000)) | np.uint32(0x8000)).view(np.float32)
            left[i] *= 2.0 ** -60
    return w, left, right


def _merge(gather, shape, left, right, add=0.0):
    out = np.empty(shape, np.uint16)
    assert merge.merge_block(gather, shape, left, right, "bf16", out=out, add=add)
    return out


def _both(monkeypatch, gather, shape, left, right, add=0.0):
    compiled = _merge(gather, shape, left, right, add)
    with monkeypatch.context() as mp:
        _numpy_route(mp)
        plain = _merge(gather, shape, left, right, add)
    return compiled, plain


@pytest.mark.parametrize("layout", ["rows", "transposed", "permuted", "cols_cut", "f32", "transposed_cols"])
def test_compiled_equals_numpy_on_every_layout(monkeypatch, layout):
    rng = np.random.default_rng(hash(layout) % 2**32)
    n, m, k = 67, 301, 16  # neither a multiple of the kernel's blocks
    stored = (rng.standard_normal((n + 5, m + 9)) * 0.02).astype(np.float32)
    bits = numerics.f32_to_bf16_bits(stored)
    rows = np.arange(n, dtype=np.int64)
    if layout == "rows":
        g, shape = merge.Gather(bits, False, rows + 5, slice(0, m)), (n, m)
    elif layout == "permuted":
        g, shape = merge.Gather(bits, False, rng.permutation(n + 5)[:n].astype(np.int64), slice(3, m + 3)), (n, m)
    elif layout == "cols_cut":
        g, shape = merge.Gather(bits, False, rows, slice(1, None, 3)), (n, len(range(m + 9)[1::3]))
    elif layout == "f32":
        g, shape = merge.Gather(stored, False, rows[::-1].copy(), slice(None)), (n, m + 9)
    elif layout == "transposed":
        g, shape = merge.Gather(np.ascontiguousarray(bits.T), True, rows, slice(0, m)), (n, m)
    else:
        g, shape = merge.Gather(np.ascontiguousarray(bits.T), True, rows[::-1].copy(), slice(2, None, 2)), \
            (n, len(range(m + 9)[2::2]))
    left = (rng.standard_normal((shape[0], k)) * 0.1)
    right = (rng.standard_normal((k, shape[1])) * 0.1)
    compiled, plain = _both(monkeypatch, g, shape, left, right)
    np.testing.assert_array_equal(compiled, plain)
    # and the values are those of the array route on the gathered matrix
    dense = np.empty(shape, np.float32)
    g.tile(0, shape[0], dense, merge.Work())
    np.testing.assert_array_equal(compiled, _merge(dense, shape, left, right))


@pytest.mark.parametrize("k,add", [(16, 0.0), (3, 1.0), (0, 1.0), (1, 0.0)])
def test_compiled_equals_numpy_near_rounding_boundaries(monkeypatch, k, add):
    rng = np.random.default_rng(k + 100)
    w, left, right = _block(rng, 40, 77, k)
    g = merge.Gather(w, False, np.arange(40, dtype=np.int64))
    compiled, plain = _both(monkeypatch, g, w.shape, left if k else None, right if k else None, add)
    np.testing.assert_array_equal(compiled, plain)


def test_ties_settled_exactly_by_the_compiled_route():
    """The cancellation case of test_merge: only the exact sum's sign decides; the kernel hands
    these elements back as candidates and they are settled by exact_round."""
    w = np.full((1, 2), 1 + 2.0 ** -8, np.float32)
    left = np.array([[1.0, 1.0, 1.0]])
    right = np.array([[2.0 ** 60, 2.0 ** 60], [2.0 ** -70, -(2.0 ** -70)], [-(2.0 ** 60), -(2.0 ** 60)]])
    got = _merge(merge.Gather(w, False, np.zeros(1, np.int64)), (1, 2), left, right)
    assert got.tolist() == [[0x3F81, 0x3F80]]


@pytest.mark.parametrize("k,add", [(0, 1.0), (5, 0.0), (3, 1.0), (17, 0.0)])
def test_compiled_equals_exact_rational_sum_rounded_once(k, add):
    rng = np.random.default_rng(k * 7 + int(add))
    w = (rng.standard_normal((9, 37)) * 0.02).astype(np.float32)
    left = rng.standard_normal((9, k)) * 0.05 * 3.7
    right = rng.standard_normal((k, 37)) * 0.05
    got = _merge(merge.Gather(w, False, np.arange(9, dtype=np.int64)), w.shape, left if k else None,
                 right if k else None, add)
    np.testing.assert_array_equal(got.astype(np.int64), _reference(w, left, right, add, "bf16"))


def test_candidate_overflow_redoes_the_block_in_numpy(monkeypatch):
    rng = np.random.default_rng(5)
    w, left, right = _block(rng, 30, 50, 4)
    g = merge.Gather(w, False, np.arange(30, dtype=np.int64))
    full = _merge(g, w.shape, left, right)
    origin, row_off, stride = g.strided()
    cand = np.empty(1000, np.int64)
    got = kernel.merge_bf16(origin, 1, row_off, stride, 30, 50, left, right, np.abs(right).max(axis=1), 0.0,
                            (4 + 8) * 2.0 ** -52, np.empty((30, 50), np.uint16), cand)
    assert got > 0  # this block has elements the kernel cannot decide from its float64 sum
    monkeypatch.setattr(merge, "CANDIDATE_CAP", 0)
    # a zero-sized list overflows on the first candidate (exact ties exist in this block)
    np.testing.assert_array_equal(_merge(g, w.shape, left, right), full)


@pytest.mark.parametrize("poison", ["nan_w", "inf_w", "overflow"])
def test_compiled_reports_non_finite(poison):
    w = np.ones((40, 50), np.float32)
    left, right = np.ones((40, 2)), np.ones((2, 50))
    if poison == "nan_w":
        w[33, 49] = np.nan
    elif poison == "inf_w":
        w[0, 0] = -np.inf
    else:
        left[:] = 1e200
        right[:] = 1e200
    out = np.empty((40, 50), np.uint16)
    g = merge.Gather(w, False, np.arange(40, dtype=np.int64))
    assert merge.merge_block(g, w.shape, left, right, "bf16", out=out) is False


def test_shapes_that_do_not_agree_are_refused_before_the_kernel_runs():
    """The kernel reads raw memory: a gather, factors or output that do not match the block are
    a ValueError, never a read out of bounds."""
    w = np.ones((8, 16), np.float32)
    g = merge.Gather(w, False, np.arange(8, dtype=np.int64))
    out = np.empty((8, 16), np.uint16)
    left, right = np.ones((8, 2)), np.ones((2, 16))
    with pytest.raises(ValueError):
        merge.merge_block(g, (8, 17), left, right, "bf16", out=np.empty((8, 17), np.uint16))
    with pytest.raises(ValueError):
        merge.merge_block(merge.Gather(w, False, np.arange(1, 9, dtype=np.int64)), (8, 16), left, right, "bf16",
                          out=out)
    with pytest.raises(ValueError):
        merge.merge_block(g, (8, 16), left, np.ones((2, 15)), "bf16", out=out)
    assert merge.merge_block(g, (8, 16), left, right, "bf16", out=out)
