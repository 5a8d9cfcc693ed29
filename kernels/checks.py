"""Argument checks shared by every implementation of a kernel (torch, Triton, MegaBlocks, few-token decode).

Each implementation module imports its checks from here (never from a sibling implementation), so no
implementation imports another and the dispatchers (:mod:`kernels.expert_linear`, :mod:`kernels.stick_breaking`)
import all of them without a cycle.
"""
from __future__ import annotations

from typing import Optional, Tuple

from torch import Tensor

from .routing import RoutingPlan

__all__ = ["check_attention_shapes", "check_attention_mask", "check_expert_linear_args"]


def check_attention_shapes(q: Tensor, k: Tensor, v: Tensor) -> Tuple[int, int, int, int, int, int]:
    """Validate q ``[B, T, K, H, D]`` against k, v ``[B, S, H, D]`` with S >= T; returns ``(B, T, K, H, D, S)``."""
    if q.dim() != 5 or k.dim() != 4 or v.shape != k.shape:
        raise ValueError(f"expected q [B,T,K,H,D] and k, v [B,S,H,D]; got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    B, T, K, H, D = q.shape
    S = k.shape[1]
    if k.shape[0] != B or k.shape[2] != H or k.shape[3] != D:
        raise ValueError(f"k/v {tuple(k.shape)} do not match q {tuple(q.shape)}")
    if S < T:
        raise ValueError(f"need S >= T (queries are the last T positions), got T={T}, S={S}")
    return B, T, K, H, D, S


def check_attention_mask(attention_mask: Optional[Tensor], B: int, S: int) -> None:
    """``attention_mask`` must be None or ``[B, S]`` (one 0/1 entry per batch row and key position)."""
    if attention_mask is not None and tuple(attention_mask.shape) != (B, S):
        raise ValueError(f"attention_mask must be [B, S] = {(B, S)}, got {tuple(attention_mask.shape)}")


def check_expert_linear_args(x: Tensor, weight: Tensor, plan: RoutingPlan, fan_out: int, grouped_in: bool,
                             gates: Optional[Tensor]) -> None:
    """Validate the operands of :func:`kernels.expert_linear.expert_linear` (see its docstring for the shapes)."""
    k, num_pairs = plan.top_k, plan.num_pairs
    if weight.dim() != 3 or weight.shape[0] != plan.num_experts:
        raise ValueError(f"weight must be [E={plan.num_experts}, in, out], got {tuple(weight.shape)}")
    if x.dim() != 2 or x.shape[1] != weight.shape[1]:
        raise ValueError(f"x must be [rows, in={weight.shape[1]}], got {tuple(x.shape)}")
    if grouped_in:
        if x.shape[0] != num_pairs:
            raise ValueError(f"grouped_in=True needs x with N*k={num_pairs} rows, got {x.shape[0]}")
    elif fan_out < 1 or k % fan_out != 0 or x.shape[0] * fan_out != num_pairs:
        raise ValueError(
            f"grouped_in=False needs fan_out dividing k={k} and x with N*k/fan_out rows; "
            f"got fan_out={fan_out}, {x.shape[0]} rows, N*k={num_pairs}"
        )
    if gates is not None and tuple(gates.shape) != (plan.num_tokens, k):
        raise ValueError(f"gates must be [N={plan.num_tokens}, k={k}], got {tuple(gates.shape)}")
