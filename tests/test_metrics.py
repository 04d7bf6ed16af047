"""Known values for verify's metrics (pure numpy)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from lora2gguf.errors import InputError
from lora2gguf.verify import metrics as M


def test_kl_two_token_known_value():
    ref = np.array([[0.0, 0.0]])
    test = np.array([[math.log(3.0), 0.0]])  # q = (0.75, 0.25)
    expect = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)  # = 0.5 ln(4/3)
    assert M.kl_divergence(ref, test)[0] == pytest.approx(expect, rel=1e-12)
    assert expect == pytest.approx(0.5 * math.log(4 / 3))
    # KL is not symmetric: the reverse direction is a different number
    rev = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    assert M.kl_divergence(test, ref)[0] == pytest.approx(rev, rel=1e-12)


def test_kl_identical_and_shifted_rows_are_zero():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(5, 1000)).astype(np.float32)
    assert np.all(M.kl_divergence(x, x) == 0)
    np.testing.assert_allclose(M.kl_divergence(x, x + 7.5), 0, atol=1e-12)


def test_large_logits_do_not_overflow():
    x = np.array([[1e4, 0.0, -1e4], [3e4, 3e4, 0.0]])
    y = np.array([[1e4 - 1.0, 0.0, -1e4], [3e4, 3e4 - math.log(3), 0.0]])
    kl = M.kl_divergence(x, y)
    assert np.all(np.isfinite(kl))
    # row 1: p = (0.5, 0.5, 0); q = (0.75, 0.25, 0)
    assert kl[1] == pytest.approx(0.5 * math.log(4 / 3), rel=1e-9)


def test_top1_agreement_counts_rows():
    ref = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 2, 3]], dtype=np.float32)
    test = np.array([[2, 0, 0], [1, 0, 0], [0, 0, 5], [0, 0, 9]], dtype=np.float32)
    assert M.top1_agreement(ref, test) == 0.75


def test_perplexity_of_uniform_is_vocab_size():
    logits = np.zeros((6, 8))
    assert M.perplexity(logits, np.array([0, 1, 2, 3, 4, 7])) == pytest.approx(8.0)


def test_perplexity_known_value():
    # p(target) = 0.75 then 0.25 -> ppl = exp(-(ln .75 + ln .25)/2) = 1/sqrt(0.1875)
    logits = np.array([[math.log(3.0), 0.0], [math.log(3.0), 0.0]])
    assert M.perplexity(logits, np.array([0, 1])) == pytest.approx(1 / math.sqrt(0.1875))


def test_percentile_matches_llama_cpp_interpolation():
    v = np.array([4.0, 1.0, 3.0, 2.0])
    assert M.percentile(v, 0.5) == 2.5
    assert M.percentile(v, 0.99) == pytest.approx(3.97)
    assert M.percentile(v, 0.0) == 1.0 and M.percentile(v, 1.0) == 4.0
    rng = np.random.default_rng(1)
    w = rng.random(101)
    assert M.percentile(w, 0.99) == pytest.approx(np.percentile(w, 99))


def test_compare_scores_second_half_against_next_tokens():
    n, V = 10, 5
    tokens = np.array([0, 1, 2, 3, 4, 0, 1, 2, 3, 4])
    ref = np.zeros((n, V))
    test = np.zeros((n, V))
    # make the test model certain of the right next token at scored rows 5..8
    for i in range(5, 9):
        test[i, tokens[i + 1]] = 50.0
    c = M.compare(ref, test, tokens)
    assert (c.first, c.n_scored) == (5, 4)
    assert c.ppl_ref == pytest.approx(5.0)
    assert c.ppl == pytest.approx(1.0, abs=1e-9)
    assert c.ln_ppl_ratio == pytest.approx(-math.log(5.0), abs=1e-9)
    # KL(uniform || q), q(target) ~ 1, q(other) ~ e^-50: sum 1/5 (ln 1/5 - ln q) = 0.8 * 50 - ln 5
    assert c.kl_mean == pytest.approx(0.8 * 50 - math.log(5), rel=1e-12)
    assert c.kl_max == c.kl_p99 == pytest.approx(c.kl_mean)
    # rows before `first` are not looked at
    test[:5] = 1e3 * np.arange(V)
    assert M.compare(ref, test, tokens) == c


def test_compare_rejects_mismatched_inputs():
    with pytest.raises(InputError, match="vocabulary"):
        M.kl_divergence(np.zeros((2, 3)), np.zeros((2, 4)))
    with pytest.raises(InputError, match="at least 2 tokens"):
        M.compare(np.zeros((1, 3)), np.zeros((1, 3)), np.array([0]))
    with pytest.raises(InputError, match="outside the vocabulary"):
        M.token_nll(np.zeros((1, 3)), np.array([3]))


@settings(max_examples=40, deadline=None)
@given(arrays(np.float64, (3, 7), elements=st.floats(-30, 30)),
       arrays(np.float64, (3, 7), elements=st.floats(-30, 30)))
def test_kl_is_nonnegative_and_matches_definition(a, b):
    kl = M.kl_divergence(a, b)
    assert np.all(kl >= 0)
    p = np.exp(a - a.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    q = np.exp(b - b.max(1, keepdims=True))
    q /= q.sum(1, keepdims=True)
    direct = np.sum(np.where(p > 0, p * (np.log(np.where(p > 0, p, 1)) - np.log(q)), 0), axis=1)
    np.testing.assert_allclose(kl, np.maximum(direct, 0), rtol=1e-9, atol=1e-12)
