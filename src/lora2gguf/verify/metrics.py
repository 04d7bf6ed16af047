"""Pure numbers over logits: KL divergence, top-1 agreement and perplexity.

Conventions follow llama.cpp's ``llama-perplexity --kl-divergence``:

- ``logits[i]`` is the model's prediction for ``tokens[i + 1]``;
- only positions ``first .. n-2`` are scored (llama.cpp scores the second half of each chunk, so
  every scored token has at least ``first`` tokens of context);
- KL divergence is ``KL(P_ref || P_test) = sum_v p_ref(v) * (log p_ref(v) - log p_test(v))`` per
  position, reported as mean, 99th percentile (linear interpolation between order statistics, as
  llama.cpp's ``percentile``), median and maximum;
- top-1 agreement ("same top p") is the fraction of scored positions where both argmaxes agree;
- perplexity is ``exp(mean negative log-likelihood)`` of the actual next tokens.

Everything is computed in float64 in row chunks so memory stays bounded for a 200k-token vocab.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from ..errors import InputError

#: rows per chunk when reducing over the vocabulary (keeps float64 temporaries ~100 MB at 200k vocab)
_CHUNK = 64


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax in float64 (numerically stable: subtracts each row's maximum)."""
    x = np.asarray(logits, dtype=np.float64)
    m = np.max(x, axis=-1, keepdims=True)
    z = x - m
    return z - np.log(np.sum(np.exp(z), axis=-1, keepdims=True))


def kl_divergence(ref_logits: np.ndarray, test_logits: np.ndarray) -> np.ndarray:
    """Per-row ``KL(softmax(ref) || softmax(test))`` in nats, float64, shape ``(rows,)``."""
    ref = np.asarray(ref_logits)
    test = np.asarray(test_logits)
    _check_pair(ref, test)
    out = np.empty(ref.shape[0], dtype=np.float64)
    for s in range(0, ref.shape[0], _CHUNK):
        lp = log_softmax(ref[s:s + _CHUNK])
        lq = log_softmax(test[s:s + _CHUNK])
        out[s:s + _CHUNK] = np.sum(np.exp(lp) * (lp - lq), axis=-1)
    # KL is >= 0; rounding can leave values like -1e-17
    return np.maximum(out, 0.0)


def top1_agreement(ref_logits: np.ndarray, test_logits: np.ndarray) -> float:
    """Fraction of rows where the argmax of both agrees."""
    ref = np.asarray(ref_logits)
    test = np.asarray(test_logits)
    _check_pair(ref, test)
    if ref.shape[0] == 0:
        raise InputError("top1_agreement: no rows to compare")
    return float(np.mean(np.argmax(ref, axis=-1) == np.argmax(test, axis=-1)))


def token_nll(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Negative log-likelihood of ``targets[i]`` under ``softmax(logits[i])``, float64."""
    lg = np.asarray(logits)
    tg = np.asarray(targets, dtype=np.int64)
    if lg.ndim != 2 or tg.shape != (lg.shape[0],):
        raise InputError(f"token_nll: logits {lg.shape} and targets {tg.shape} do not line up "
                         "(need (rows, vocab) and (rows,))")
    if tg.size and (tg.min() < 0 or tg.max() >= lg.shape[1]):
        raise InputError(f"token_nll: a target id is outside the vocabulary of {lg.shape[1]}")
    out = np.empty(lg.shape[0], dtype=np.float64)
    for s in range(0, lg.shape[0], _CHUNK):
        ls = log_softmax(lg[s:s + _CHUNK])
        out[s:s + _CHUNK] = -ls[np.arange(ls.shape[0]), tg[s:s + _CHUNK]]
    return out


def perplexity(logits: np.ndarray, targets: np.ndarray) -> float:
    """``exp(mean NLL)`` of ``targets`` under ``logits`` (rows already aligned)."""
    nll = token_nll(logits, targets)
    if nll.size == 0:
        raise InputError("perplexity: no tokens to score")
    return float(np.exp(np.mean(nll)))


def percentile(values: np.ndarray, fraction: float) -> float:
    """llama.cpp's percentile: linear interpolation between sorted values at ``fraction*(n-1)``."""
    v = np.sort(np.asarray(values, dtype=np.float64))
    if v.size == 0:
        raise InputError("percentile of no values")
    if fraction <= 0:
        return float(v[0])
    if fraction >= 1:
        return float(v[-1])
    p = fraction * (v.size - 1)
    i = int(p)
    p -= i
    return float((1 - p) * v[i] + p * v[min(i + 1, v.size - 1)])


@dataclass(frozen=True)
class Comparison:
    """A test model's next-token distributions against a reference's on the same tokens."""

    n_scored: int
    first: int
    kl_mean: float
    kl_median: float
    kl_p99: float
    kl_max: float
    top1: float
    ppl: float
    ppl_ref: float
    ln_ppl_ratio: float

    def to_dict(self) -> dict:
        return asdict(self)


def scored_rows(n_tokens: int, first: int | None = None) -> tuple[int, int]:
    """The (start, stop) logits rows scored for ``n_tokens`` tokens: rows ``first .. n-2``
    (default ``first = n_tokens // 2``, as llama-perplexity scores the second half of a chunk)."""
    if n_tokens < 2:
        raise InputError(f"need at least 2 tokens to score next-token predictions, got {n_tokens}")
    if first is None:
        first = n_tokens // 2
    if not 0 <= first <= n_tokens - 2:
        raise InputError(f"first scored position {first} is outside 0..{n_tokens - 2}")
    return first, n_tokens - 1


def compare(ref_logits: np.ndarray, test_logits: np.ndarray, tokens: np.ndarray,
            first: int | None = None) -> Comparison:
    """Compare full-sequence logits (``(n_tokens, vocab)`` each) of a reference and a test model on
    ``tokens``; rows ``first .. n-2`` are scored against the next tokens."""
    tok = np.asarray(tokens, dtype=np.int64)
    ref = np.asarray(ref_logits)
    test = np.asarray(test_logits)
    if ref.ndim != 2 or ref.shape[0] < tok.size or test.shape[0] < tok.size:
        raise InputError(f"compare: logits {ref.shape} / {test.shape} do not cover {tok.size} tokens")
    a, b = scored_rows(tok.size, first)
    r, t = ref[a:b], test[a:b]
    targets = tok[a + 1:b + 1]
    kl = kl_divergence(r, t)
    nll_t = token_nll(t, targets)
    nll_r = token_nll(r, targets)
    return Comparison(
        n_scored=int(b - a), first=int(a),
        kl_mean=float(np.mean(kl)), kl_median=percentile(kl, 0.5), kl_p99=percentile(kl, 0.99),
        kl_max=float(np.max(kl)), top1=top1_agreement(r, t),
        ppl=float(np.exp(np.mean(nll_t))), ppl_ref=float(np.exp(np.mean(nll_r))),
        ln_ppl_ratio=float(np.mean(nll_t) - np.mean(nll_r)),
    )


def _check_pair(ref: np.ndarray, test: np.ndarray) -> None:
    if ref.ndim != 2 or ref.shape != test.shape:
        raise InputError(f"logits shapes differ or are not (rows, vocab): reference {ref.shape}, "
                         f"test {test.shape}; both models must share one vocabulary")
