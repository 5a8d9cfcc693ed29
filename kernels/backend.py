"""Kernel backend resolution, shared by the expert linear and stick-breaking attention dispatchers.

One function, :func:`resolve_backend`, turns a user-facing backend name (``ModuleFormerConfig.kernel_backend``)
into the concrete backend to run for a given set of tensors:

- ``"auto"``: ``"triton"`` when triton imports and the tensors are on CUDA, else ``"torch"``.
- ``"torch"``: pure PyTorch (any device, any dtype).
- ``"triton"``: the Triton kernels. On CUDA tensors this needs triton; on CPU tensors it is allowed only under the
  Triton interpreter (``TRITON_INTERPRET=1``, used by the tests), since compiled Triton kernels cannot run on CPU.
- ``"megablocks"``: optional, GPU-only grouped GEMM from MegaBlocks' ``grouped_gemm`` dependency for the MLP experts
  (see :mod:`kernels.megablocks_backend`). Callers that have no MegaBlocks path (attention) treat it as ``"auto"``.

Nothing here imports triton or megablocks at module import time.
"""
from __future__ import annotations

import functools
import importlib
import os

import torch

__all__ = ["BACKENDS", "KernelCache", "resolve_backend", "triton_available", "triton_interpret", "megablocks_available",
           "tracing"]

BACKENDS = ("auto", "torch", "triton", "megablocks")


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    """Whether ``import triton`` succeeds (cached)."""
    try:
        importlib.import_module("triton")
        importlib.import_module("triton.language")
    except Exception:  # ImportError, or a broken install raising at import
        return False
    return True


def triton_interpret() -> bool:
    """Whether the Triton interpreter is requested (``TRITON_INTERPRET=1``); read live, not cached."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


@functools.lru_cache(maxsize=None)
def megablocks_available() -> bool:
    """Whether MegaBlocks' grouped GEMM (``grouped_gemm.ops.gmm``) imports (cached)."""
    try:
        importlib.import_module("grouped_gemm.ops")
    except Exception:
        return False
    return True


def tracing() -> bool:
    """Whether torch.compile or torch.export is tracing: kernels then skip host reads and pointer checks (they take
    the always-correct path instead of the data-dependent shortcut)."""
    return torch.compiler.is_compiling() or torch.compiler.is_exporting()


def _device_type(tensors) -> str:
    """'cuda' if any given tensor (or ``torch.device``) is on CUDA, else the first one's device type ('cpu' if none)."""
    types = [t.device.type if isinstance(t, torch.Tensor) else t.type for t in tensors
             if isinstance(t, (torch.Tensor, torch.device))]
    if "cuda" in types:
        return "cuda"
    return types[0] if types else "cpu"


def resolve_backend(name: str, *tensors: torch.Tensor | torch.device) -> str:
    """Resolve a backend name for the given tensors to ``"torch"``, ``"triton"`` or ``"megablocks"``.

    :param name: one of :data:`BACKENDS` (``"auto"``, ``"torch"``, ``"triton"``, ``"megablocks"``).
    :param tensors: the operands of the call, or their devices (only devices are inspected; ``None`` is skipped).

    Called by the kernel selectors (``expert_linear_kernel``, ``stick_breaking_kernel``) once per module and
    device, never per step: modules keep the implementation they got (see :class:`KernelCache`).
    :returns: the concrete backend; never ``"auto"``.
    :raises ValueError: unknown name (the message lists the choices).
    :raises RuntimeError: ``"triton"`` without triton, or on CPU tensors without ``TRITON_INTERPRET=1``;
        ``"megablocks"`` without MegaBlocks' ``grouped_gemm`` installed, or on non-CUDA tensors.
    """
    if name not in BACKENDS:
        raise ValueError(f"unknown kernel backend {name!r}; valid choices: {', '.join(BACKENDS)}")
    device = _device_type(tensors)
    if name == "torch":
        return "torch"
    if name == "auto":
        return "triton" if device == "cuda" and triton_available() else "torch"
    if name == "triton":
        if not triton_available():
            raise RuntimeError("kernel backend 'triton' requested but triton is not importable (pip install triton)")
        if device != "cuda" and not triton_interpret():
            raise RuntimeError(
                f"kernel backend 'triton' needs CUDA tensors (got {device}); on CPU it runs only under the Triton "
                "interpreter: set TRITON_INTERPRET=1 before triton kernels are first imported (tests only, slow), "
                "or use kernel_backend='torch' / 'auto'"
            )
        return "triton"
    # megablocks
    if not megablocks_available():
        raise RuntimeError(
            "kernel backend 'megablocks' requested but MegaBlocks' grouped GEMM is not importable. It is GPU-only "
            "and cannot be installed on CPU machines; on a CUDA machine run `pip install megablocks` (or just "
            "`pip install grouped_gemm`), or use kernel_backend='triton' / 'torch' / 'auto'"
        )
    if device != "cuda":
        raise RuntimeError(f"kernel backend 'megablocks' needs CUDA tensors (got {device})")
    return "megablocks"


class KernelCache:
    """One kernel implementation per device type for a fixed backend name, resolved on first use.

    ``select(backend, device) -> impl`` is a kernel's selector (e.g.
    :func:`kernels.expert_linear.expert_linear_kernel`).
    A module holds one cache per kernel and calls ``cache(device)`` in its forward: a dict lookup, not a resolution.
    Changing the backend name (``cache.backend = ...``) drops the resolved implementations.
    """

    def __init__(self, select, backend: str) -> None:
        self._select = select
        self._impls: dict = {}
        self.backend = backend

    @property
    def backend(self) -> str:
        return self._backend

    @backend.setter
    def backend(self, name: str) -> None:
        self._backend = name
        self._impls = {}

    def __call__(self, device: torch.device):
        impl = self._impls.get(device.type)
        if impl is None:
            impl = self._impls[device.type] = self._select(self._backend, device)
        return impl
