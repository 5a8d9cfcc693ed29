"""Routed per-expert linear map: gather rows into expert order -> grouped GEMM -> scatter / gate-weighted combine.

One function, :func:`expert_linear`, serves every expert projection of ModuleFormer (weights ``[E, in, out]``,
applied as ``x_row @ weight[e]``):

- MLP experts:   ``h = expert_linear(x, W_in, plan, fan_out=k, grouped_out=True)``; ``a = act(h)``;
                 ``y = expert_linear(a, W_out, plan, fan_out=1, grouped_in=True, gates=gates)``  -> ``[N, D]``
- MoA query map: ``expert_linear(x, W_q, plan, fan_out=k)``  -> ``[N*k, att_hidden]`` (token-major)
- MoA reduce:    ``expert_linear(o.reshape(N*k, h), W_o, plan, fan_out=1, gates=gates)``  -> ``[N, D]``

Implementations (siblings; shared argument checks in :mod:`kernels.checks`): ``"torch"``
(:mod:`kernels.torch_expert_linear`: index gather + ``F.grouped_mm`` + ``index_add_``, hand-written backward),
``"triton"`` (:mod:`kernels.triton_expert_linear`, scatter-to-scatter kernels; on CPU only under
``TRITON_INTERPRET=1``), ``"megablocks"`` (:mod:`kernels.megablocks_backend`, GPU-only, optional), ``"auto"``
(triton on CUDA, torch otherwise). :func:`expert_linear_kernel` resolves a name for a device once; modules keep
the implementation (:class:`kernels.backend.KernelCache`). :func:`expert_linear` resolves per call (one-off use).
For a few tokens (decode) :mod:`kernels.few_token_experts` skips the routing plan altogether.
"""
from __future__ import annotations

from typing import Optional

from typing import Callable

import torch
from torch import Tensor

from .backend import BACKENDS, resolve_backend
from .checks import check_expert_linear_args
from .routing import RoutingPlan
from .torch_expert_linear import torch_expert_linear

__all__ = ["expert_linear", "expert_linear_kernel", "BACKENDS"]


def expert_linear(
    x: Tensor,
    weight: Tensor,
    plan: RoutingPlan,
    *,
    fan_out: int,
    grouped_in: bool = False,
    grouped_out: bool = False,
    gates: Optional[Tensor] = None,
    backend: str = "auto",
) -> Tensor:
    """Apply each (token, expert) pair's expert weight: ``y_p = x_row(p) @ weight[e_p]``.

    With N tokens, k = ``plan.top_k``, P = N*k pairs (p = t*k + j) and E experts:

    :param x: input rows. ``grouped_in=False``: ``[M, in]`` with M = P / fan_out in token-major ("scattered")
        order, pair p reads row ``p // fan_out`` (map: x = tokens ``[N, in]``, fan_out = k; reduce: pair rows
        ``[P, in]``, fan_out = 1). ``grouped_in=True``: ``[P, in]`` already in the plan's expert-sorted order.
    :param weight: ``[E, in, out]`` (ModuleFormer layout, no transpose).
    :param plan: :class:`~kernels.routing.RoutingPlan` of the routing.
    :param fan_out: pairs per input row (k or 1, see ``x``); must divide k when ``grouped_in=False``.
    :param grouped_out: return ``[P, out]`` in expert-sorted order instead of token-major order.
    :param gates: optional ``[N, k]`` gate weights. If given, returns ``[N, out]`` with
        ``y[t] = sum_j gates[t, j] * y_{t*k+j}`` and ``grouped_out`` is ignored.
    :param backend: ``"auto"`` | ``"torch"`` | ``"triton"`` | ``"megablocks"`` (see :mod:`kernels.backend`).
    :returns: ``[N, out]`` with gates; else ``[P, out]`` (expert-sorted if ``grouped_out``, else token-major).

    Differentiable in ``x``, ``weight`` and ``gates``. No host sync on the grouped-GEMM path; dtypes/layouts that
    ``F.grouped_mm`` refuses (fp64, feature dims not a multiple of 16 bytes) use a per-expert loop fallback that
    reads the expert counts back to the host.
    """
    return expert_linear_kernel(backend, x.device)(x, weight, plan, fan_out, grouped_in, grouped_out, gates)


def _triton_impl(x, weight, plan, fan_out, grouped_in=False, grouped_out=False, gates=None):
    from .triton_expert_linear import triton_expert_linear

    check_expert_linear_args(x, weight, plan, fan_out, grouped_in, gates)
    return triton_expert_linear(x, weight, plan, fan_out=fan_out, grouped_in=grouped_in, grouped_out=grouped_out,
                                gates=gates)


def _megablocks_impl(x, weight, plan, fan_out, grouped_in=False, grouped_out=False, gates=None):
    from .megablocks_backend import megablocks_expert_linear

    check_expert_linear_args(x, weight, plan, fan_out, grouped_in, gates)
    return megablocks_expert_linear(x, weight, plan, fan_out, grouped_in, grouped_out, gates)


_IMPLS = {"torch": torch_expert_linear, "triton": _triton_impl, "megablocks": _megablocks_impl}


def expert_linear_kernel(backend: str, device: torch.device | str) -> Callable:
    """Resolve ``backend`` for tensors on ``device`` (once; modules keep the result) and return
    ``impl(x, weight, plan, fan_out, grouped_in=False, grouped_out=False, gates=None)`` with the semantics of
    :func:`expert_linear`. Raises as :func:`kernels.backend.resolve_backend` does."""
    return _IMPLS[resolve_backend(backend, torch.device(device))]
