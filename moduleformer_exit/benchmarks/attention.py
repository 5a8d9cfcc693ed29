"""Stick-breaking attention forward vs ``F.scaled_dot_product_attention(is_causal=True)``: time and peak memory."""
from __future__ import annotations

import statistics
from typing import Callable, List, Sequence

import torch
import torch.nn.functional as F

from ..kernels.stick_breaking import stick_breaking_attention
from .timing import process_settings, time_calls

__all__ = ["bench_stick_breaking", "peak_memory_mb"]


def peak_memory_mb(fn: Callable[[], object]) -> float:
    """Peak extra memory (MiB) allocated by the torch allocator while ``fn()`` runs, its result included.

    CUDA: ``reset_peak_memory_stats`` / ``max_memory_allocated`` minus the memory allocated before the call.
    CPU: ``torch.profiler`` with ``profile_memory=True``; every op event carries the bytes it allocated itself
    (``self_cpu_memory_usage``, at its start time) and frees arrive as ``[memory]`` events with negative sizes.
    Replaying them in time order gives the live-bytes curve, whose maximum is returned. It counts what goes
    through the torch allocator (every tensor), not raw mallocs inside a kernel (e.g. MKL workspaces).
    """
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        out = fn()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        del out
        return peak / 2**20
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
        del out
    deltas = []
    for event in prof.events():
        size = event.cpu_memory_usage if event.name == "[memory]" else event.self_cpu_memory_usage
        if size:
            deltas.append((event.time_range.start, size))
    deltas.sort()
    live = peak = 0
    for _, size in deltas:
        live += size
        peak = max(peak, live)
    return peak / 2**20


def bench_stick_breaking(seq_lens: Sequence[int] = (512, 1024, 2048), batch: int = 1, query_heads: int = 16,
                         head_dim: int = 64, query_sets: int = 2, threads: int = 2, repeats: int = 5,
                         dtype: torch.dtype = torch.float32, skip_underflow: bool = True) -> List[dict]:
    """Forward (inference, no grad) of stick-breaking attention vs causal SDPA at equal size, one dict per T.

    Stick-breaking: q [batch, T, query_sets, query_heads // query_sets, head_dim] against k, v
    [batch, T, query_heads // query_sets, head_dim] (the query sets share one K/V head, as in ModuleFormer).
    SDPA: q, k, v [batch, query_heads, T, head_dim], ``is_causal=True``. Inputs are standard normal.

    Returns dicts with ``T``, ``sb_ms``, ``sdpa_ms`` (medians of ``repeats`` interleaved runs after a warm-up),
    ``ratio`` (sb / sdpa), ``sb_peak_mb``, ``sdpa_peak_mb`` (MiB, outputs included; see :func:`peak_memory_mb`).
    ``skip_underflow=False`` times the full causal walk (the worst case: inputs whose sticks never run out); the
    default lets a row block stop once all its remaining weights underflow fp32, which for standard-normal
    inputs happens after a few hundred keys. Accuracy is covered by tests/test_stick_breaking.py.
    """
    if query_heads % query_sets:
        raise ValueError("query_heads must be a multiple of query_sets")
    heads = query_heads // query_sets
    results = []
    with process_settings(threads=threads):
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for T in seq_lens:
                q = torch.randn(batch, T, query_sets, heads, head_dim, generator=gen).to(dtype)
                k = torch.randn(batch, T, heads, head_dim, generator=gen).to(dtype)
                v = torch.randn(batch, T, heads, head_dim, generator=gen).to(dtype)
                qs, ks, vs = (torch.randn(batch, query_heads, T, head_dim, generator=gen).to(dtype) for _ in range(3))

                def sb():
                    return stick_breaking_attention(q, k, v, skip_underflow=skip_underflow)

                def sdpa():
                    return F.scaled_dot_product_attention(qs, ks, vs, is_causal=True)

                times = time_calls({"sb": sb, "sdpa": sdpa}, repeats)
                sb_ms, sdpa_ms = statistics.median(times["sb"]), statistics.median(times["sdpa"])
                results.append(dict(T=T, sb_ms=sb_ms, sdpa_ms=sdpa_ms, ratio=sb_ms / sdpa_ms,
                                    sb_peak_mb=peak_memory_mb(sb), sdpa_peak_mb=peak_memory_mb(sdpa)))
    return results


if __name__ == "__main__":  # python -m moduleformer_exit.benchmarks.attention
    for skip in (True, False):
        print(f"skip_underflow={skip}")
        for row in bench_stick_breaking(skip_underflow=skip):
            print("  T={T:5d}  sb {sb_ms:8.1f} ms  sdpa {sdpa_ms:8.1f} ms  ratio {ratio:5.2f}  "
                  "peak sb {sb_peak_mb:6.1f} MiB  sdpa {sdpa_peak_mb:6.1f} MiB".format(**row))
