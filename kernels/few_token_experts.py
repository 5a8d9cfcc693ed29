"""Routed expert linear maps for a few tokens (decode): the selected experts' weights are used directly.

For N*k pairs with N small (one new token per sequence), the routing plan (sort, offsets, inverse permutation)
and the gather/scatter around a grouped GEMM cost more than the GEMVs themselves. Here each (token, slot) pair
multiplies its row by its expert's matrix directly:

- CPU, eager: the k selected expert ids are read on the host (a plain memory read on CPU, not a device sync) and
  each pair is one GEMV on a view ``weight[e]``: every selected weight is read exactly once, nothing is copied;
- elsewhere (CUDA, or while torch.compile / torch.export trace): ``weight[top_k_indices]`` gathers the selected
  slices ([N, k, in, out]) and one batched matmul runs over them (no host read, no data-dependent control flow).

On the CPU loop the reduce's gate-weighted sum accumulates in place (``addmm_`` with the host-read gates as
``alpha``), so no ``[N, k, out]`` intermediate is written. Same results as :func:`kernels.expert_linear.expert_linear`
up to fp32 rounding. Inference only: the CPU loop writes into preallocated outputs, so callers use it when no
gradient is needed (the MoE layer checks).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .backend import tracing

__all__ = ["few_token_map", "few_token_reduce", "FEW_TOKENS"]

FEW_TOKENS = 4  # up to this many routed tokens per call, MoE layers take this path at inference


def _host_loop(x: Tensor) -> bool:
    return x.device.type == "cpu" and not tracing()


def few_token_map(x: Tensor, weight: Tensor, top_k_indices: Tensor) -> Tensor:
    """``y[t, j] = x[t] @ weight[top_k_indices[t, j]]``.

    :param x: ``[N, in]`` token rows.
    :param weight: ``[E, in, out]``.
    :param top_k_indices: ``[N, k]`` expert ids.
    :returns: ``[N, k, out]`` (token-major pairs, as the general path's map).
    """
    n, k = top_k_indices.shape
    if not _host_loop(x):
        w = weight[top_k_indices.reshape(-1)]  # [N*k, in, out] gathered slices
        return torch.bmm(x.repeat_interleave(k, 0).unsqueeze(1), w).view(n, k, -1)
    out = x.new_empty(n * k, weight.shape[2])  # pair rows p = t*k + j
    ids = top_k_indices.tolist()  # CPU: a memory read, not a device sync
    for t, row in enumerate(ids):
        xt = x if n == 1 else x[t:t + 1]
        for j, e in enumerate(row):
            torch.mm(xt, weight[e], out=out[t * k + j:t * k + j + 1])
    return out.view(n, k, -1)


def few_token_reduce(h: Tensor, weight: Tensor, top_k_indices: Tensor, gates: Tensor) -> Tensor:
    """``y[t] = sum_j gates[t, j] * h[t, j] @ weight[top_k_indices[t, j]]``.

    :param h: ``[N, k, in]`` per-pair rows.
    :param weight: ``[E, in, out]``.
    :param top_k_indices: ``[N, k]`` expert ids.
    :param gates: ``[N, k]`` gate weights.
    :returns: ``[N, out]``.
    """
    n, k = top_k_indices.shape
    if not _host_loop(h):
        w = weight[top_k_indices.reshape(-1)]  # [N*k, in, out]
        y = torch.bmm(h.reshape(n * k, 1, -1), w).view(n, k, -1)  # [N, k, out]
        return torch.bmm(gates.to(y.dtype).unsqueeze(1), y).squeeze(1)  # gate-weighted sum over the k slots
    out = h.new_empty(n, weight.shape[2])
    pairs = h.reshape(n * k, -1)
    ids, weights = top_k_indices.tolist(), gates.tolist()
    for t, (row, g) in enumerate(zip(ids, weights)):
        yt = out if n == 1 else out[t:t + 1]
        torch.mm(pairs[t * k:t * k + 1], weight[row[0]], out=yt).mul_(g[0])
        for j in range(1, k):  # y += g_j * h_j W[e_j], accumulated in place (no [N, k, out] intermediate)
            yt.addmm_(pairs[t * k + j:t * k + j + 1], weight[row[j]], alpha=g[j])
    return out
