"""LoRA math: pure functions over numpy arrays, computed in float64.

Facts (PEFT's conventions):
- Linear layers: W (out, in) += s * B @ A with A (r, in), B (out, r); with fan_in_fan_out the
  base weight is stored (in, out) and the delta is transposed.
- Scaling s = alpha / r, or alpha / sqrt(r) with rsLoRA; `rank_pattern` / `alpha_pattern` keys
  match the end of a module key on a dot boundary (regex `(.*\\.)?KEY$`), first key wins.
- Expert parameters (PEFT's ParamWrapper over a 3-D parameter of shape (E, in, out), the
  layout of fused expert tensors in transformers): A is saved as (r*E, in) and read as (E, r, in); B is saved as
  (out, r*E) and read as (out, r, E): the expert index is the slow axis of A's rows but the
  fast axis of B's columns. delta[e] = s * (A_e^T @ B_e^T) with shape (in, out). A parameter
  stored (E, out, in) (each expert a Linear weight, as transformers 5.x's fused MoE
  experts) has in = its last axis: delta[e] = s * B_e @ A_e.
- A delta is handed to the merge as two factors (left, right) with the scale folded into B:
  layout views cut them (layout.View.factors) and merge.merge_block adds left @ right.
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


def linear_factors(a: np.ndarray, b: np.ndarray, scale: float, *, fan_in_fan_out: bool = False
                   ) -> tuple[np.ndarray, np.ndarray]:
    """(left, right), float64, with ``left @ right`` the delta of a Linear weight in its stored
    layout: (out, in), or (in, out) with fan_in_fan_out. The scale is folded into B, one float64
    product per element of B (the values merge.RULE sums, whatever layout they end up in)."""
    a = np.asarray(a, dtype=np.float64)
    bs = np.asarray(b, dtype=np.float64) * scale  # (out, r)
    if fan_in_fan_out:  # stored (in, out): delta^T = A^T @ (sB)^T
        return a.T, bs.T
    return bs, a


def linear_delta(a: np.ndarray, b: np.ndarray, scale: float, *, fan_in_fan_out: bool = False,
                 rows: slice | None = None) -> np.ndarray:
    """s * B @ A for a Linear weight, float64, shape (out, in) (or (in, out) with fan_in_fan_out);
    ``rows`` selects a slab of the stored weight's leading axis."""
    left, right = linear_factors(a, b, scale, fan_in_fan_out=fan_in_fan_out)
    return (left if rows is None else left[rows]) @ right


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


def expert_matrix_factors(a: np.ndarray, b: np.ndarray, scale: float, num_experts: int, e: int,
                          layout: str = "in_out") -> tuple[np.ndarray, np.ndarray]:
    """(left, right), float64, with ``left @ right`` the delta of expert ``e`` of a 3-D parameter
    as PEFT's ParamWrapper computes it: stored (E, in, out) (``layout`` "in_out", an experts module
    PEFT calls transposed): A_e^T @ (s B_e)^T; stored (E, out, in) ("out_in", each expert a Linear
    weight): (s B_e) @ A_e."""
    a_e, b_e = expert_factors(np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64), num_experts, e)
    if layout == "out_in":
        return b_e * scale, a_e
    return a_e.T, (b_e * scale).T


def expert_delta(a: np.ndarray, b: np.ndarray, scale: float, num_experts: int,
                 experts: slice | None = None, layout: str = "in_out") -> np.ndarray:
    """Delta of a 3-D expert parameter in its stored layout, float64, for the selected experts."""
    sel = range(num_experts)[experts] if experts is not None else range(num_experts)
    return np.stack([np.matmul(*expert_matrix_factors(a, b, scale, num_experts, e, layout)) for e in sel])


def expert_rank(a_rows: int, num_experts: int) -> int:
    if a_rows % num_experts:
        raise ValueError(f"lora_A has {a_rows} rows, not a multiple of {num_experts} experts")
    return a_rows // num_experts
