"""Routing plan: sort token->expert assignments into expert order, on device and without host sync.

A token t routed to k experts gives k *pairs* p = t*k + j ("scattered" = token-major order). The plan sorts the
pairs by expert id (stable, so pairs of one expert keep token order) and records where each expert's rows end.
Every expert kernel (torch grouped GEMM now, Triton later) consumes this one plan; nothing in it needs the host.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["RoutingPlan", "plan_routing"]


@dataclass(frozen=True)
class RoutingPlan:
    """Expert-sorted view of a top-k routing, built by :func:`plan_routing`. All tensors live on the routing device.

    With N tokens, k = ``top_k`` experts per token, E = ``num_experts`` and P = N*k pairs (pair p = t*k + j):

    - ``sorted_expert_idxs``: ``[P]`` int64, expert id at each expert-sorted ("grouped") position (non-decreasing).
    - ``sorted_scattered_idxs``: ``[P]`` int64, pair index p at each grouped position (a permutation of 0..P-1;
      within one expert, increasing).
    - ``expert_offsets``: ``[E]`` int64, inclusive END offset of each expert's rows in grouped order
      (cumsum of counts, no leading 0; expert e owns rows ``[offsets[e-1], offsets[e])``).
    - ``expert_counts``: ``[E]`` int64, rows per expert (0 for an unused expert).
    - ``scattered_to_sorted``: ``[P]`` int64, inverse permutation: grouped position of pair p.
    - ``sorted_token_idxs``: ``[P]`` int64, token t = p // k at each grouped position (the gather index of a map).
    - ``expert_offsets_i32``: ``[E]`` int32 copy of ``expert_offsets`` (the ``offs`` format of ``F.grouped_mm``).
    - ``num_experts``, ``top_k``: E and k; ``num_tokens`` = N.
    """

    sorted_expert_idxs: Tensor
    sorted_scattered_idxs: Tensor
    expert_offsets: Tensor
    expert_counts: Tensor
    scattered_to_sorted: Tensor
    sorted_token_idxs: Tensor
    expert_offsets_i32: Tensor
    num_experts: int
    top_k: int

    @property
    def num_tokens(self) -> int:
        """N, the number of routed tokens (from shapes only; no sync)."""
        return self.sorted_scattered_idxs.numel() // self.top_k

    @property
    def num_pairs(self) -> int:
        """P = N*k, the number of (token, expert) pairs."""
        return self.sorted_scattered_idxs.numel()


def plan_routing(top_k_indices: Tensor, num_experts: int) -> RoutingPlan:
    """Build the :class:`RoutingPlan` of a top-k routing.

    :param top_k_indices: ``[N, k]`` integer expert ids in ``[0, num_experts)`` (not range-checked: that would sync).
    :param num_experts: E.
    :returns: the plan; every tensor is computed on ``top_k_indices.device`` with no host read
        (stable sort + searchsorted, not ``bincount``, whose CUDA kernel reads the max back to size its output).
    """
    if top_k_indices.dim() != 2:
        raise ValueError(f"top_k_indices must be [N, k], got shape {tuple(top_k_indices.shape)}")
    if top_k_indices.dtype.is_floating_point or top_k_indices.dtype.is_complex or top_k_indices.dtype == torch.bool:
        raise TypeError(f"top_k_indices must be an integer tensor, got {top_k_indices.dtype}")
    n, k = top_k_indices.shape
    if k < 1 or k > num_experts:
        raise ValueError(f"need 1 <= k <= num_experts, got k={k}, num_experts={num_experts}")
    device = top_k_indices.device
    flat = top_k_indices.reshape(-1).to(torch.int64)
    sorted_expert_idxs, sorted_scattered_idxs = torch.sort(flat, stable=True)
    experts = torch.arange(num_experts, device=device, dtype=torch.int64)
    # Inclusive end offsets = number of sorted ids <= e.
    expert_offsets = torch.searchsorted(sorted_expert_idxs, experts, right=True)
    expert_counts = torch.diff(expert_offsets, prepend=expert_offsets.new_zeros(1))
    positions = torch.arange(flat.numel(), device=device, dtype=torch.int64)
    scattered_to_sorted = torch.empty_like(positions).scatter_(0, sorted_scattered_idxs, positions)
    return RoutingPlan(
        sorted_expert_idxs=sorted_expert_idxs,
        sorted_scattered_idxs=sorted_scattered_idxs,
        expert_offsets=expert_offsets,
        expert_counts=expert_counts,
        scattered_to_sorted=scattered_to_sorted,
        sorted_token_idxs=torch.div(sorted_scattered_idxs, k, rounding_mode="floor"),
        expert_offsets_i32=expert_offsets.to(torch.int32),
        num_experts=num_experts,
        top_k=k,
    )
