"""Benchmark: routed expert MLP (kernels.expert_linear) against a dense FFN of the same active FLOPs.

Efficiency = dense time / MoE time, where "dense" is ``gelu_new(X @ W1) @ W2`` with X ``[N*k, d]``, W1 ``[d, h]``,
W2 ``[h, d]`` (what the experts compute if all N*k rows shared one expert), and "MoE" is the full expert path on a
precomputed uniform top-k routing: gather, grouped GEMM, activation, grouped GEMM, gate-weighted combine.
A grouped GEMM cannot beat the dense GEMM of equal FLOPs, so ~1.0 is the ceiling; the gap is dispatch overhead
plus reading E weight matrices instead of one.

On CPU the torch grouped GEMM is one MKL call per expert, i.e. one OpenMP parallel region (and barrier) per
expert: when other processes compete for the cores, each barrier can wait a scheduler slice, so the MoE path
degrades far more than the dense one (a handful of regions). Medians from a loaded machine are therefore
pessimistic; ``*_eff_best`` (fastest repeats) approximates the uncontended ratio.

Run: ``python -m moduleformer_exit.benchmarks.moe [--naive]``.
"""
from __future__ import annotations

import argparse
import json
import statistics
from typing import Iterable, Optional

import torch
import torch.nn.functional as F

from ..kernels.expert_linear import expert_linear
from ..kernels.routing import RoutingPlan, plan_routing
from .timing import process_settings, time_calls

__all__ = ["bench_moe_mlp", "moe_mlp_forward", "dense_mlp_forward", "naive_moe_mlp_forward"]

DEFAULT_SHAPES = ((4096, 1024, 1024, 32, 2), (4096, 1024, 256, 64, 4))  # (N, d, h, E, k)


def _gelu_new(t: torch.Tensor) -> torch.Tensor:
    return F.gelu(t, approximate="tanh")  # == transformers' gelu_new


def moe_mlp_forward(x, w1, w2, plan: RoutingPlan, gates, backend: str = "auto") -> torch.Tensor:
    """ModuleFormer expert MLP on a routing plan: x ``[N, d]``, w1 ``[E, d, h]``, w2 ``[E, h, d]``,
    gates ``[N, k]`` -> ``[N, d]``. The hidden activation stays in expert order between the two GEMMs."""
    hid = expert_linear(x, w1, plan, fan_out=plan.top_k, grouped_out=True, backend=backend)  # [N*k, h] grouped
    return expert_linear(_gelu_new(hid), w2, plan, fan_out=1, grouped_in=True, gates=gates, backend=backend)


def dense_mlp_forward(x, w1, w2) -> torch.Tensor:
    """The equal-FLOPs dense reference: x ``[N*k, d]``, w1 ``[d, h]``, w2 ``[h, d]`` -> ``[N*k, d]``."""
    return _gelu_new(x @ w1) @ w2


def naive_moe_mlp_forward(x, w1, w2, top_k_indices, gates) -> torch.Tensor:
    """IBM ModuleFormer-style dispatch for context: sort, expert sizes to a Python list (host sync), one ``mm``
    per expert in a Python loop, ``index_add`` combine. Shapes as :func:`moe_mlp_forward`."""
    n, k = top_k_indices.shape
    flat = top_k_indices.reshape(-1)
    _, order = flat.sort(stable=True)
    sizes = torch.bincount(flat, minlength=w1.shape[0]).tolist()
    token = order // k
    xs = x[token].split(sizes)
    ys = [_gelu_new(xe @ w1[e]) @ w2[e] for e, xe in enumerate(xs) if sizes[e]]
    y = torch.cat(ys) * gates.reshape(-1)[order].unsqueeze(1)
    return x.new_zeros(n, w2.shape[2]).index_add(0, token, y)


def _uniform_topk(n: int, e: int, k: int, gen: torch.Generator) -> torch.Tensor:
    """[N, k] distinct experts per token, uniformly at random."""
    return torch.rand(n, e, generator=gen).topk(k, dim=1).indices


def bench_moe_mlp(
    shapes: Iterable[tuple] = DEFAULT_SHAPES,
    threads: int = 2,
    repeats: int = 7,
    warmup: int = 2,
    dtype: torch.dtype = torch.float32,
    naive: bool = False,
    malloc_tuning: bool = True,
    seed: int = 0,
) -> list[dict]:
    """Time the expert MLP against its equal-FLOPs dense FFN; one dict per shape ``(N, d, h, E, k)`` with keys
    ``N, d, h, E, k, fwd_moe_ms, fwd_dense_ms, fwd_eff, fwdbwd_moe_ms, fwdbwd_dense_ms, fwdbwd_eff`` (medians over
    ``repeats`` after ``warmup``; eff = dense / MoE), ``fwd_eff_best, fwdbwd_eff_best`` (the same ratio of the
    fastest repeats), ``layer_fwd_ms, layer_fwd_eff, layer_fwdbwd_ms, layer_fwdbwd_eff`` (the whole ``MoE`` layer:
    router, aux loss and experts on its own routing; fastest repeats; eff = dense / layer), plus
    ``naive_fwd_ms, naive_fwdbwd_ms`` when ``naive``.

    Forward runs under ``no_grad``; forward+backward backpropagates a fixed random cotangent into x, both weights
    and (MoE) the gates. The variants are interleaved within each repeat so machine noise hits them alike.
    """
    # malloc_tuning keeps freed large blocks in glibc's heap (mmap/trim thresholds 1 GiB) for the run: on small VMs
    # each fresh 32 MB tensor otherwise costs ~30 ms of page faults, which swamps memory-bound ops.
    with process_settings(threads=threads, malloc_threshold=(1 << 30) if malloc_tuning else None):
        return [_bench_shape(*s, repeats=repeats, warmup=warmup, dtype=dtype, naive=naive, seed=seed) for s in shapes]


def _moe_layer(d: int, h: int, e: int, k: int, w1, w2, dtype: torch.dtype):
    """A ModuleFormer MLP ``MoE`` (mlp router of width 256, ``mi`` aux loss, gelu_new) with the bench's expert
    weights, in training mode without dropout or sampling (the router is part of the timed layer)."""
    from ..modeling import _activation
    from ..moe import MoE

    layer = MoE(d, h, num_experts=e, top_k=k, activation=_activation("gelu_new"), gating_size=256).to(dtype)
    with torch.no_grad():
        layer.experts.weight.copy_(w1)
        layer.output_experts.weight.copy_(w2)
    return layer.train()


def _bench_shape(n, d, h, e, k, *, repeats, warmup, dtype, naive, seed) -> dict:
    gen = torch.Generator().manual_seed(seed)
    idx = _uniform_topk(n, e, k, gen)
    plan = plan_routing(idx, e)
    probs = torch.rand(n, k, generator=gen)
    x = torch.randn(n, d, generator=gen).to(dtype).requires_grad_()
    w1 = (torch.rand(e, d, h, generator=gen) * 2 - 1).div_(d).to(dtype).requires_grad_()
    w2 = (torch.rand(e, h, d, generator=gen) * 2 - 1).div_(h).to(dtype).requires_grad_()
    gates = probs.to(dtype).requires_grad_()
    cot = torch.randn(n, d, generator=gen).to(dtype)
    xd = torch.randn(n * k, d, generator=gen).to(dtype).requires_grad_()
    w1d = w1[0].detach().clone().requires_grad_()
    w2d = w2[0].detach().clone().requires_grad_()
    cotd = torch.randn(n * k, d, generator=gen).to(dtype)
    moe_params, dense_params = (x, w1, w2, gates), (xd, w1d, w2d)

    def fwd_bwd(forward, params, cotangent):
        def run():
            for p in params:
                p.grad = None
            forward().backward(cotangent)

        return run

    def no_grad(forward):
        def run():
            with torch.no_grad():
                forward()

        return run

    moe = lambda: moe_mlp_forward(x, w1, w2, plan, gates)  # noqa: E731
    dense = lambda: dense_mlp_forward(xd, w1d, w2d)  # noqa: E731
    layer = _moe_layer(d, h, e, k, w1, w2, dtype)
    xl = x.detach().clone().view(1, n, d).requires_grad_()
    layer_params = (xl, *layer.parameters())

    def layer_forward():  # the whole layer: router, aux loss, experts; backward through y and the aux loss
        y, aux = layer(xl, compute_aux=torch.is_grad_enabled())
        return y.view(n, d) if aux is None else (y.view(n, d), aux)

    def layer_fwd_bwd():
        for p in layer_params:
            p.grad = None
        y, aux = layer_forward()
        ((y * cot).sum() + aux).backward()

    fns = {
        "fwd_dense": no_grad(dense),
        "fwd_moe": no_grad(moe),
        "fwd_layer": no_grad(layer_forward),
        "fwdbwd_dense": fwd_bwd(dense, dense_params, cotd),
        "fwdbwd_moe": fwd_bwd(moe, moe_params, cot),
        "fwdbwd_layer": layer_fwd_bwd,
    }
    if naive:
        nv = lambda: naive_moe_mlp_forward(x, w1, w2, idx, gates)  # noqa: E731
        fns["naive_fwd"] = no_grad(nv)
        fns["naive_fwdbwd"] = fwd_bwd(nv, moe_params, cot)
    times = time_calls(fns, repeats, warmup)
    med = {name: statistics.median(v) for name, v in times.items()}
    best = {name: min(v) for name, v in times.items()}
    row = dict(N=n, d=d, h=h, E=e, k=k)
    for phase in ("fwd", "fwdbwd"):
        row[f"{phase}_moe_ms"] = round(med[f"{phase}_moe"], 2)
        row[f"{phase}_dense_ms"] = round(med[f"{phase}_dense"], 2)
        row[f"{phase}_eff"] = round(med[f"{phase}_dense"] / med[f"{phase}_moe"], 3)
    for phase in ("fwd", "fwdbwd"):  # best-of-repeats: less sensitive to other processes on a shared machine
        row[f"{phase}_eff_best"] = round(best[f"{phase}_dense"] / best[f"{phase}_moe"], 3)
    for phase in ("fwd", "fwdbwd"):  # the whole layer (router + aux loss + experts), fastest repeats
        row[f"layer_{phase}_ms"] = round(best[f"{phase}_layer"], 2)
        row[f"layer_{phase}_eff"] = round(best[f"{phase}_dense"] / best[f"{phase}_layer"], 3)
    if naive:
        row["naive_fwd_ms"] = round(med["naive_fwd"], 2)
        row["naive_fwdbwd_ms"] = round(med["naive_fwdbwd"], 2)
    return row


def main(argv: Optional[list] = None) -> None:
    """CLI: print one JSON line per shape."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--naive", action="store_true", help="also time an IBM-style per-expert Python loop")
    ap.add_argument("--no-malloc-tuning", action="store_true")
    args = ap.parse_args(argv)
    rows = bench_moe_mlp(threads=args.threads, repeats=args.repeats, warmup=args.warmup, naive=args.naive,
                         malloc_tuning=not args.no_malloc_tuning)
    for row in rows:
        print(json.dumps(row))


if __name__ == "__main__":
    main()
