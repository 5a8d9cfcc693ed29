"""Stick-breaking attention: the one dispatcher over its implementations (torch, Triton).

Definition (moduleformer-architecture.md §4), for one (batch, query set, head), query row i, key j <= i:

    l_ij = scale * q_i . k_j,   z_ij = sigmoid(l_ij)
    A_ij = z_ij * prod_{j < m <= i} (1 - z_im)          (diagonal included, no remainder term)
    out_i = sum_j A_ij v_j

In log space ``log A_ij = l_ij - sum_{j <= m <= i} softplus(l_im)``: the logit minus an inclusive reverse
cumulative sum (the stick is broken from the diagonal backwards); every log A <= 0, so no running max is needed.

Implementations (siblings; shared argument checks in :mod:`kernels.checks`):

- ``"torch"``: :mod:`kernels.torch_stick_breaking` (blocked, O(T*S), recompute backward; direct decode path);
- ``"triton"``: :mod:`kernels.triton_stick_breaking` (flash-style kernels; CUDA, or CPU under TRITON_INTERPRET=1).

:func:`stick_breaking_kernel` resolves a backend name for a device ONCE and returns the implementation; modules
keep what it returns (per device) and call it directly. :func:`stick_breaking_attention` is the one-off functional
form (resolves on every call: fine for scripts and tests, not for per-step hot paths).
"""
from __future__ import annotations

import functools
from typing import Callable, Optional

import torch
from torch import Tensor

from .backend import resolve_backend
from .torch_stick_breaking import torch_stick_breaking_attention

__all__ = ["stick_breaking_attention", "stick_breaking_kernel"]


def _triton_impl(q, k, v, attention_mask=None, scale=None, block_size=64, key_block_size=None, skip_underflow=None):
    """The Triton kernels with the torch path's signature (the block options are torch-only: Triton has its own
    tiles)."""
    from .triton_stick_breaking import triton_stick_breaking_attention

    return triton_stick_breaking_attention(q, k, v, attention_mask, scale=None if scale is None else float(scale))


@functools.lru_cache(maxsize=None)
def _kernel(name: str) -> Callable:
    if name == "triton":
        from . import triton_stick_breaking  # noqa: F401  (import, hence compile-decorate, once at resolution)

        return _triton_impl
    return torch_stick_breaking_attention


def stick_breaking_kernel(backend: str, device: torch.device | str) -> Callable:
    """Resolve ``backend`` for tensors on ``device``; returns ``impl(q, k, v, attention_mask=None, scale=None,
    block_size=64, key_block_size=None, skip_underflow=None) -> [B, T, K, H, D]`` (see
    :func:`stick_breaking_attention` for the arguments). ``"megablocks"`` is an MLP-only backend: here it means
    ``"auto"``. Raises as :func:`kernels.backend.resolve_backend` does."""
    name = resolve_backend("auto" if backend == "megablocks" else backend, torch.device(device))
    return _kernel(name)


def stick_breaking_attention(q: Tensor, k: Tensor, v: Tensor, attention_mask: Optional[Tensor] = None, *,
                             scale: Optional[float] = None, block_size: int = 64,
                             key_block_size: Optional[int] = None, skip_underflow: Optional[bool] = None,
                             backend: str = "auto") -> Tensor:
    """ModuleFormer stick-breaking attention (diagonal included, no remainder), O(T*S) time and memory.

    Args:
        q: [B, T, K, H, D] queries: K query sets (selected attention experts) per position, H heads. They are the
            LAST T of the S positions: query r sees keys 0 .. S-T+r (diagonal included).
        k, v: [B, S, H, D] keys/values shared by the K query sets (S >= T; S > T = KV-cache prefix).
        attention_mask: optional [B, S] 0/1 (bool, int or float); masked keys get weight 0 and do not break the
            stick (ModuleFormer's additive finfo.min before the sigmoid). A row with no visible key returns 0.
        scale: logit scale, default 1/sqrt(D).
        block_size: query positions per row block (rows per matmul = K * block_size).
        key_block_size: keys per chunk after the diagonal one; default 128, raised for short row blocks (decode)
            so that one chunk has about 128K elements.
        skip_underflow: stop a row block's walk back once every remaining weight provably underflows fp32
            (every stick is used up); exact at fp32 resolution, but one host sync per key chunk. Default: on
            for CPU tensors, off elsewhere. False forces the full causal walk (worst-case timing).
        backend: ``"auto"`` (Triton kernels on CUDA tensors when triton imports, else torch), ``"torch"`` (this
            module's blocked path), ``"triton"`` (:mod:`kernels.triton_stick_breaking`; CUDA, or CPU under
            ``TRITON_INTERPRET=1``) or ``"megablocks"`` (an MLP-only backend: attention treats it as ``"auto"``).
            Resolved by :func:`kernels.backend.resolve_backend`. ``block_size``, ``key_block_size`` and
            ``skip_underflow`` apply to the torch path only (the Triton kernels use their own tile sizes).

    Returns:
        [B, T, K, H, D] in q's dtype (computed in fp32, fp64 for fp64 inputs). Differentiable w.r.t. q, k, v
        through a recompute backward (memory linear in T and S).
    """
    return stick_breaking_kernel(backend, q.device)(q, k, v, attention_mask, scale, block_size, key_block_size,
                                                     skip_underflow)
