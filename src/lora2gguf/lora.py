"""LoRA math: pure functions over numpy arrays, computed in float32.

Facts (PEFT's conventions):
- Linear layers: W (out, in) += s * B @ A with A (r, in), B (out, r); with fan_in_fan_out the
  base weight is stored (in, out) and the delta is transposed.
- Scaling s = alpha / r, or alpha / sqrt(r) with rsLoRA; `rank_pattern` / `alpha_pattern` keys
  match the end of a module key on a dot boundary (regex `(.*\\.)?KEY$`), first key wins.
- Expert parameters (PEFT's ParamWrapper over a 3-D parameter of shape (E, in, out), as
  GPT-OSS stores its experts): A is saved as (r*E, in) and read as (E, r, in); B is saved as
  (out, r*E) and read as (out, r, E): the expert index is the slow axis of A's rows but the
  fast axis of B's columns. delta[e] = s * (A_e^T @ B_e^T) with shape (in, out).
"""

from __future__ import annotations

import math
import re
from typing import Mapping

import numpy as np


def scaling(alpha: float, r: int, use_rslora: bool = False) -> float:
    """The factor PEFT multiplies B @ A by."""
    if r <= 0:
        raise ValueError(f"LoRA rank must be positive, got {r}")
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def pattern_value(patterns: Mapping[str, float], key: str, default: float) -> float:
    """PEFT's rank/alpha pattern lookup: the first pattern that matches the end of `key`."""
    for pattern in patterns:
        if re.match(rf"(.*\.)?({pattern})$", key):
            return patterns[pattern]
    return default


def linear_delta(a: np.ndarray, b: np.ndarray, scale: float, *, fan_in_fan_out: bool = False,
                 rows: slice | None = None) -> np.ndarray:
    """s * B @ A for a Linear weight, float32, shape (out, in) (or (in, out) with fan_in_fan_out).

    `rows` selects a slab of the leading axis of the stored weight, so a large weight can be
    merged slab by slab.
    """
    a = np.asarray(a, dtype=np.float32)
    b = np.asarray(b, dtype=np.float32)
    if fan_in_fan_out:
        # stored (in, out): delta^T = A^T @ B^T; rows index `in`
        at = a.T if rows is None else a.T[rows]
        return (at @ b.T) * np.float32(scale)
    bb = b if rows is None else b[rows]
    return (bb @ a) * np.float32(scale)


def expert_factors(a: np.ndarray, b: np.ndarray, num_experts: int, e: int) -> tuple[np.ndarray, np.ndarray]:
    """Expert e's own pair from PEFT's stacked factors: A_e (r, in) and B_e (out, r), views.

    a: (r*E, in), b: (out, r*E); delta[e] = s * (A_e^T @ B_e^T), i.e. delta[e]^T = s * (B_e @ A_e).
    """
    rE, n_in = a.shape
    n_out = b.shape[0]
    if rE % num_experts or b.shape[1] != rE:
        raise ValueError(f"expert LoRA shapes A{a.shape} B{b.shape} do not fit {num_experts} experts")
    r = rE // num_experts
    return a.reshape(num_experts, r, n_in)[e], b.reshape(n_out, r, num_experts)[:, :, e]


def expert_delta(a: np.ndarray, b: np.ndarray, scale: float, num_experts: int,
                 experts: slice | None = None) -> np.ndarray:
    """Delta for an expert parameter of shape (E, in, out), as PEFT's ParamWrapper computes it.

    a: (r*E, in), b: (out, r*E). Returns float32 (e, in, out) for the selected experts.
    """
    a = np.asarray(a, dtype=np.float32)
    b = np.asarray(b, dtype=np.float32)
    n_in, n_out = a.shape[1], b.shape[0]
    sel = range(num_experts)[experts] if experts is not None else range(num_experts)
    out = np.empty((len(sel), n_in, n_out), dtype=np.float32)
    for i, e in enumerate(sel):
        a_e, b_e = expert_factors(a, b, num_experts, e)
        np.matmul(a_e.T, b_e.T, out=out[i])  # (in, r) @ (r, out)
    out *= np.float32(scale)
    return out


def expert_rank(a_rows: int, num_experts: int) -> int:
    if a_rows % num_experts:
        raise ValueError(f"lora_A has {a_rows} rows, not a multiple of {num_experts} experts")
    return a_rows // num_experts
