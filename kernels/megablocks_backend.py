"""Optional ``"megablocks"`` backend of :func:`kernels.expert_linear.expert_linear` (GPU only, UNTESTED here).

Uses the grouped GEMM that MegaBlocks depends on (``grouped_gemm.ops.gmm(a [M, in], b [E, in, out], batch_sizes)``,
CUTLASS, bf16) in place of ``F.grouped_mm``; gather / scatter / gate combine are plain differentiable torch ops and
``gmm`` brings its own backward. Install on a CUDA machine with ``pip install megablocks`` (or ``grouped_gemm``);
neither installs on CPU-only machines, so this adapter cannot be exercised by the CPU test suite, and it is meant as a
benchmark anchor. Note ``gmm`` takes per-expert counts **on the host**: this path syncs once per call (as MegaBlocks'
own grouped path does), unlike the torch and triton backends.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .routing import RoutingPlan

__all__ = ["megablocks_expert_linear"]


def megablocks_expert_linear(x: Tensor, weight: Tensor, plan: RoutingPlan, fan_out: int, grouped_in: bool,
                             grouped_out: bool, gates) -> Tensor:
    """Same contract as ``expert_linear`` (positional form used by its dispatcher); see that docstring for shapes."""
    from grouped_gemm import ops  # resolve_backend already checked it imports (the dispatcher checked the shapes)

    if grouped_in:
        x_s = x
    else:
        src = plan.sorted_scattered_idxs if fan_out == 1 else torch.div(plan.sorted_scattered_idxs, fan_out,
                                                                          rounding_mode="floor")
        x_s = x.index_select(0, src)  # [P, in] expert-sorted
    y_s = ops.gmm(x_s.contiguous(), weight.contiguous(), plan.expert_counts.cpu(), trans_b=False)  # host sync
    if gates is not None:
        g_s = gates.reshape(-1).index_select(0, plan.sorted_scattered_idxs).to(y_s.dtype)
        out = y_s.new_zeros(plan.num_tokens, y_s.shape[1])
        return out.index_add(0, plan.sorted_token_idxs, y_s * g_s.unsqueeze(1))
    return y_s if grouped_out else y_s.index_select(0, plan.scattered_to_sorted)
