"""GPU benchmark rows: routed expert MLP with the Triton / torch / MegaBlocks backends vs a dense GEMM pair.

Only runs on a CUDA device (``moduleformer-exit bench --device cuda``); importing it needs neither a GPU nor triton.
Each row times the ModuleFormer expert MLP (``expert_linear`` map with ``grouped_out`` -> gelu -> ``expert_linear``
reduce with ``grouped_in`` and gates) on a fixed uniform top-k routing, forward and forward+backward, and compares it
with the dense FFN of the same active FLOPs (X ``[N*k, d]`` @ W1 ``[d, h]`` -> gelu -> @ W2 ``[h, d]``):
``eff = dense time / path time`` (≈1.0 is the ceiling for a grouped GEMM). The routing plan is built once outside the
timed region (it is shared by the two projections of a layer in the model as well).
"""
from __future__ import annotations

import statistics
from typing import Callable, Iterable, Optional

import torch

from ..kernels.backend import megablocks_available, resolve_backend
from ..kernels.routing import plan_routing
from .moe import dense_mlp_forward, moe_mlp_forward
from .timing import time_calls

__all__ = ["bench_expert_kernels_cuda", "DEFAULT_CUDA_SHAPES"]

DEFAULT_CUDA_SHAPES = ((16384, 1024, 4096, 32, 2),)  # (N tokens, d, h, E, k)


def bench_expert_kernels_cuda(
    shapes: Iterable[tuple] = DEFAULT_CUDA_SHAPES,
    dtype: torch.dtype = torch.bfloat16,
    backends: Iterable[str] = ("triton", "torch", "megablocks"),
    repeats: int = 20,
    warmup: int = 5,
    seed: int = 0,
    device: str = "cuda",
) -> list[dict]:
    """Time the routed expert MLP per backend against the dense GEMM pair of equal active FLOPs.

    :param shapes: tuples ``(N, d, h, E, k)``; default ``(16384, 1024, 4096, 32, 2)``.
    :param dtype: operand dtype (bf16 default).
    :param backends: expert_linear backends to time; ``"megablocks"`` is skipped when not installed.
    :returns: one dict per (shape, path) with keys ``N, d, h, E, k, path`` (``dense`` | backend name),
        ``fwd_ms, fwdbwd_ms`` (medians), ``fwd_tflops, fwdbwd_tflops`` (active FLOPs: 4·N·k·d·h forward, 3x that
        forward+backward), ``fwd_eff, fwdbwd_eff`` (dense / path) and ``max_err`` (forward max abs difference vs the
        torch backend; 0 for torch / dense).
    :raises RuntimeError: without a CUDA device.
    """
    if not torch.cuda.is_available():
        raise RuntimeError("bench_expert_kernels_cuda needs a CUDA device")
    rows = []
    for n, d, h, e, k in shapes:
        rows.extend(_bench_shape(n, d, h, e, k, dtype=dtype, backends=tuple(backends), repeats=repeats,
                                 warmup=warmup, seed=seed, device=device))
    return rows


def _bench_shape(n, d, h, e, k, *, dtype, backends, repeats, warmup, seed, device) -> list[dict]:
    gen = torch.Generator(device=device).manual_seed(seed)
    idx = torch.rand(n, e, generator=gen, device=device).topk(k, dim=1).indices  # uniform routing, distinct experts
    plan = plan_routing(idx, e)
    x = torch.randn(n, d, generator=gen, device=device).to(dtype).requires_grad_()
    w1 = (torch.rand(e, d, h, generator=gen, device=device) * 2 - 1).div_(d ** 0.5).to(dtype).requires_grad_()
    w2 = (torch.rand(e, h, d, generator=gen, device=device) * 2 - 1).div_(h ** 0.5).to(dtype).requires_grad_()
    gates = torch.rand(n, k, generator=gen, device=device).to(dtype).requires_grad_()
    cot = torch.randn(n, d, generator=gen, device=device).to(dtype)
    xd = torch.randn(n * k, d, generator=gen, device=device).to(dtype).requires_grad_()
    w1d, w2d = w1[0].detach().clone().requires_grad_(), w2[0].detach().clone().requires_grad_()
    cotd = torch.randn(n * k, d, generator=gen, device=device).to(dtype)
    flops_fwd = 4.0 * n * k * d * h

    def timed(forward, params, cotangent):
        def fwd():
            with torch.no_grad():
                forward()

        def fwd_bwd():
            for p in params:
                p.grad = None
            forward().backward(cotangent)

        times = time_calls({"fwd": fwd, "fwd_bwd": fwd_bwd}, repeats, warmup, cuda=True)
        return statistics.median(times["fwd"]), statistics.median(times["fwd_bwd"])

    paths: dict[str, Optional[Callable]] = {"dense": lambda: dense_mlp_forward(xd, w1d, w2d)}
    for name in backends:
        if name == "megablocks" and not megablocks_available():
            continue
        resolve_backend(name, x)  # clear error now rather than mid-timing
        paths[name] = (lambda b: (lambda: moe_mlp_forward(x, w1, w2, plan, gates, backend=b)))(name)
    with torch.no_grad():
        ref = moe_mlp_forward(x, w1, w2, plan, gates, backend="torch").float()
    results = {}
    for name, fn in paths.items():
        params, cotangent = ((xd, w1d, w2d), cotd) if name == "dense" else ((x, w1, w2, gates), cot)
        results[name] = timed(fn, params, cotangent)
    dense_fwd, dense_fb = results["dense"]
    rows = []
    for name, (fwd_ms, fb_ms) in results.items():
        err = 0.0
        if name not in ("dense", "torch"):
            with torch.no_grad():
                err = (paths[name]().float() - ref).abs().max().item()
        rows.append(dict(
            N=n, d=d, h=h, E=e, k=k, path=name,
            fwd_ms=round(fwd_ms, 3), fwdbwd_ms=round(fb_ms, 3),
            fwd_tflops=round(flops_fwd / fwd_ms / 1e9, 1), fwdbwd_tflops=round(3 * flops_fwd / fb_ms / 1e9, 1),
            fwd_eff=round(dense_fwd / fwd_ms, 3), fwdbwd_eff=round(dense_fb / fb_ms, 3),
            max_err=round(err, 5),
        ))
    return rows


TABLE_COLUMNS = [("N", "d"), ("d", "d"), ("h", "d"), ("E", "d"), ("k", "d"), ("path", ""), ("fwd_ms", ".3f"),
                 ("fwd_tflops", ".1f"), ("fwd_eff", ".2f"), ("fwdbwd_ms", ".3f"), ("fwdbwd_tflops", ".1f"),
                 ("fwdbwd_eff", ".2f"), ("max_err", ".2g")]
"""Columns for ``cli._table`` (name, format), in display order."""
