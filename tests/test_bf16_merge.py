"""bf16_merge: the fused kernel gives, bit for bit, what the generic route gives (base widened,
delta (B@A)*s per term in float32, added in order, one RNE rounding, then the layout transform),
for both expert layouts of GPT-OSS, odd sizes, several terms and non-power-of-two scales; and it
reports NaN/Inf instead of writing them."""

from __future__ import annotations

import numpy as np
import pytest

from lora2gguf import bf16_merge, layout, lora
from lora2gguf.numerics import bf16_bits_to_f32, f32_to_bf16_bits


def _generic(base_bits, pairs, num_experts, transform):
    """The generic route of stream.merged_slab + encode + layout, for every expert."""
    x = bf16_bits_to_f32(base_bits)
    for a, b, s in pairs:
        x += lora.expert_delta(a, b, s, num_experts)
    return layout.TRANSFORMS[transform](f32_to_bf16_bits(x))


def _fused(base_bits, pairs, num_experts, transform, scratch):
    outs = []
    for cols in bf16_merge.OUTPUT_COLUMNS[transform]:
        n_out = base_bits[0][:, cols].shape[1]
        piece = np.empty((num_experts, n_out, base_bits.shape[1]), np.uint16)
        for e in range(num_experts):
            terms = []
            for a, b, s in pairs:
                a_e, b_e = lora.expert_factors(a, b, num_experts, e)
                terms.append(bf16_merge.ExpertTerm(a_e, np.ascontiguousarray(b_e[cols]), s))
            assert bf16_merge.merge_transpose(base_bits[e][:, cols], terms, piece[e], scratch)
        outs.append(piece)
    return outs


def _case(rng, e, n_in, n_out, ranks, scale_of):
    base = f32_to_bf16_bits((rng.standard_normal((e, n_in, n_out)) * 0.02).astype(np.float32))
    pairs = []
    for r in ranks:
        a = (rng.standard_normal((r * e, n_in)) * 0.05).astype(np.float32)
        b = (rng.standard_normal((n_out, r * e)) * 0.05).astype(np.float32)
        pairs.append((a, b, scale_of(r)))
    return base, pairs


@pytest.mark.parametrize("transform", sorted(bf16_merge.OUTPUT_COLUMNS))
@pytest.mark.parametrize("n_in,n_out,ranks,tile", [
    (64, 96, (8,), 64),            # a whole tile
    (45, 130, (16,), 64),          # rows not a multiple of the tile
    (2880 // 16, 2 * 77, (4, 2), 16),  # two LoRA terms on one tensor, small tiles
    (33, 6, (1,), 64),             # fewer rows than a tile
])
@pytest.mark.parametrize("scale", ["alpha/r", "rslora"])
def test_fused_equals_generic_bit_for_bit(transform, n_in, n_out, ranks, tile, scale):
    rng = np.random.default_rng(n_in * 1000 + n_out)
    scale_of = (lambda r: 32 / r) if scale == "alpha/r" else (lambda r: 24 / np.sqrt(r))
    base, pairs = _case(rng, 3, n_in, n_out, ranks, scale_of)
    want = _generic(base, pairs, 3, transform)
    got = _fused(base, pairs, 3, transform, bf16_merge.Scratch(n_in, rows=tile))
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.shape == w.shape and g.dtype == np.uint16
        np.testing.assert_array_equal(g, w)


def test_scratch_is_reused_across_shapes_of_the_same_width():
    rng = np.random.default_rng(1)
    scratch = bf16_merge.Scratch(40, rows=8)
    for n_out in (8, 17, 3):
        base, pairs = _case(rng, 2, 40, n_out, (2,), lambda r: 1.5)
        np.testing.assert_array_equal(_fused(base, pairs, 2, "transpose", scratch)[0],
                                      _generic(base, pairs, 2, "transpose")[0])


@pytest.mark.parametrize("poison", ["inf_delta", "nan_base", "overflow"])
def test_nan_or_inf_is_reported_not_written(poison):
    rng = np.random.default_rng(2)
    base, [(a, b, s)] = _case(rng, 1, 16, 8, (2,), lambda r: 1.0)
    if poison == "inf_delta":
        b[3, 0] = np.inf
    elif poison == "nan_base":
        base[0, 5, 2] = 0x7FC0  # bf16 NaN
    else:
        a[:] = 3e38
        b[:] = 3e38
    a_e, b_e = lora.expert_factors(a, b, 1, 0)
    out = np.empty((8, 16), np.uint16)
    ok = bf16_merge.merge_transpose(base[0], [bf16_merge.ExpertTerm(a_e, np.ascontiguousarray(b_e), s)], out,
                                    bf16_merge.Scratch(16))
    assert ok is False
