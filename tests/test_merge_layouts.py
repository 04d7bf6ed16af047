"""The merge gives the same bits whichever orientation computes it: a BF16 expert merged in the
Hugging Face layout (in, out) and then transposed / de-interleaved, and the same expert merged
directly in GGUF's layout by the stream (a transposing gather in cache-sized tiles, the LoRA
factors cut by the layout view), for both expert layouts of GPT-OSS, odd sizes, several terms
and non-power-of-two scales. (The successor of test_bf16_merge.py: the fused kernel and the
generic route it compared are now one route, and this is the same claim about orientations.)"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from lora2gguf import layout, lora, merge, stream
from lora2gguf.adapter import LoraTerm
from lora2gguf.numerics import bf16_bits_to_f32, f32_to_bf16_bits
from lora2gguf.plan import OutTensor, TensorPlan, Input
from lora2gguf.safetensors_io import TensorInfo
from lora2gguf.sources import Source

import gguf

OPS = {"transpose": layout.Transpose(), "transpose_split_interleaved": layout.Split(2, interleaved=True, transpose=True)}


def _source(bits: np.ndarray) -> Source:
    info = TensorInfo("experts", "BF16", bits.shape, Path("/nonexistent"), 0, bits.nbytes)
    return Source("experts", bits.shape, "BF16",
                  read=lambda sl: bf16_bits_to_f32(bits if sl is None else bits[sl]),
                  stored=(info,), read_stored=lambda sl: bits if sl is None else bits[sl])


def _term(a, b, scale, e) -> stream.Factors:
    info = TensorInfo("lora", "F32", a.shape, Path("/nonexistent"), 0, 0)
    t = LoraTerm("experts", "experts", info, info, a.shape[0] // e, 1.0, scale, "experts", num_experts=e)
    return stream.Factors(t, a.astype(np.float64), b.astype(np.float64))


def _hf_then_layout(base_bits, factors, num_experts, op):
    """Merge each expert in the HF layout (in, out), then apply the layout to the bits."""
    outs = [[] for _ in range(op.n_outputs)]
    for e in range(num_experts):
        w = bf16_bits_to_f32(base_bits[e])
        lefts, rights = zip(*(stream.source_factors(f, e) for f in factors))
        left, right = np.concatenate(lefts, axis=1), np.concatenate(rights, axis=0)
        merged = np.empty(w.shape, np.uint16)
        assert merge.merge_block(w, w.shape, left, right, "bf16", out=merged)
        for j, view in enumerate(op.views({}, w.shape)):
            outs[j].append(view.apply(merged))
    return [np.stack(o) for o in outs]


def _gguf_layout(base_bits, factors, op, block_rows):
    """The stream's unit computation on the GGUF layout (cache-sized transposing gathers)."""
    src = _source(base_bits)
    got = []
    for o in op.outputs({}, [base_bits.shape]):
        tp = TensorPlan(OutTensor("t.weight", o.shape, gguf.GGMLQuantizationType.BF16), (Input(src),), o.parts,
                        block_rows=block_rows)
        out = np.empty(o.shape, np.uint16)
        scratch = stream._Scratch()
        for matrix, rows in tp.blocks():
            piece = stream.compute_unit(tp, matrix, rows, [factors], scratch, lambda s, d: np.empty(s, d))
            out[matrix, rows] = piece
        got.append(out)
    return got


def _case(rng, e, n_in, n_out, ranks, scale_of):
    base = f32_to_bf16_bits((rng.standard_normal((e, n_in, n_out)) * 0.02).astype(np.float32))
    terms = []
    for r in ranks:
        a = (rng.standard_normal((r * e, n_in)) * 0.05).astype(np.float32)
        b = (rng.standard_normal((n_out, r * e)) * 0.05).astype(np.float32)
        terms.append(_term(a, b, scale_of(r), e))
    return base, terms


@pytest.mark.parametrize("transform", sorted(OPS))
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
    base, terms = _case(rng, 3, n_in, n_out, ranks, scale_of)
    want = _hf_then_layout(base, terms, 3, OPS[transform])
    got = _gguf_layout(base, terms, OPS[transform], block_rows=tile)
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.shape == w.shape and g.dtype == np.uint16
        np.testing.assert_array_equal(g, w)


def test_views_cut_the_lora_factors_like_the_delta():
    """For every layout op, the output matrix of the delta equals the delta of the cut factors."""
    rng = np.random.default_rng(4)
    left, right = rng.standard_normal((12, 3)), rng.standard_normal((3, 8))
    delta = left @ right
    ops = [layout.Copy(), layout.Transpose(), layout.Split(2, True, True), layout.Split(2, False, False),
           layout.Split(2, True, axis="cols"), layout.PermuteHeads("h")]
    for op in ops:
        for view in op.views({"h": 2}, delta.shape):
            lf, rf = view.factors(left, right)
            np.testing.assert_allclose(lf @ rf, view.apply(delta), rtol=1e-12, atol=1e-12, err_msg=repr(op))


def test_rope_permutation_matches_the_reshape_formula():
    """llama.cpp's permute: reshape (n_head, 2, d/2, ...), swap axes 1 and 2."""
    w = np.arange(24 * 3).reshape(24, 3)
    for heads in (1, 2, 3, 6):
        ref = w.reshape(heads, 2, 24 // heads // 2, 3).swapaxes(1, 2).reshape(24, 3)
        np.testing.assert_array_equal(layout.View(rows=layout.rope_permutation(24, heads)).apply(w), ref)


def test_nan_or_inf_is_reported_not_written():
    rng = np.random.default_rng(2)
    base, [f] = _case(rng, 1, 16, 8, (2,), lambda r: 1.0)
    f.b[3, 0] = np.inf
    src = _source(base)
    o = layout.Transpose().outputs({}, [base.shape])[0]
    tp = TensorPlan(OutTensor("t.weight", o.shape, gguf.GGMLQuantizationType.BF16), (Input(src, (f.term,)),), o.parts)
    from lora2gguf.errors import NumericError

    with pytest.raises(NumericError, match="NaN or Inf"):
        stream.compute_unit(tp, 0, slice(0, 8), [[f]], stream._Scratch(), lambda s, d: np.empty(s, d))
    assert lora.expert_rank(2, 1) == 2
