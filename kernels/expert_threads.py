"""CPU grouped GEMMs scheduled across threads by expert: each thread runs one single-threaded grouped GEMM over a
contiguous block of experts.

``F.grouped_mm`` on CPU runs one multi-threaded GEMM per expert: with many small experts (E=64 of ~256 rows) every
expert pays an OpenMP fork/join, and two-thread GEMMs of small matrices scale poorly. Here the experts are cut into
``torch.get_num_threads()`` blocks of about equal rows (cuts from the plan's offsets: a memory read on CPU) and each
block is one ``F.grouped_mm`` with one intra-op thread, in its own Python thread (torch releases the GIL inside
its ops). Every output element is the same dot product as in the serial call (the work is split by rows or by
expert, never along the contraction), so results match it to fp32 rounding.

While the blocks run, the process's intra-op thread count is 1 (``torch.set_num_threads`` is process-wide); it is
restored before returning. Small GEMMs (below :data:`MIN_FLOPS`) and traced calls keep the serial path.

Opt-in (``MODULEFORMER_EXPERT_THREADS=1``, read at import, or :data:`ENABLED`): on a 2-core VM it was faster than
the serial call while other processes competed for the cores (E=64 expert path fwd 0.49-0.54 of dense vs 0.14-0.41)
but slower on a quieter machine (0.66-0.73 vs 0.71), so the serial call stays the default.
"""
from __future__ import annotations

import bisect
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Optional

import torch
from torch import Tensor

from .backend import tracing

__all__ = ["ENABLED", "MIN_FLOPS", "threaded_grouped_mm", "threaded_grouped_mm_wgrad"]

ENABLED = os.environ.get("MODULEFORMER_EXPERT_THREADS", "0").strip().lower() in ("1", "true", "yes", "on")
MIN_FLOPS = 1 << 28  # below ~0.27 GFLOP the hand-off to threads costs more than the per-expert barriers it saves

_pool: Optional[ThreadPoolExecutor] = None  # helper threads (the caller's thread runs the first block)
_pool_size = 0
_run_lock = threading.Lock()  # one split GEMM at a time: each sets and restores the process-wide thread count
_active = threading.local()


def _workers(flops: int, num_experts: int, device: torch.device) -> int:
    """Threads to split over (0: keep the serial call)."""
    threads = torch.get_num_threads()
    if (not ENABLED or device.type != "cpu" or threads < 2 or num_experts < threads or flops < MIN_FLOPS or tracing()
            or getattr(_active, "inside", False)):
        return 0
    return threads


def _expert_blocks(offsets: list[int], blocks: int) -> list[tuple[int, int]]:
    """``blocks`` contiguous expert ranges ``[e0, e1)`` of about equal rows (inclusive end offsets given)."""
    total = offsets[-1]
    cuts = [0] + [min(len(offsets), bisect.bisect_left(offsets, total * b // blocks) + 1) for b in range(1, blocks)]
    cuts.append(len(offsets))
    return [(lo, hi) for lo, hi in zip(cuts, cuts[1:]) if hi > lo]


def _run(jobs: list[Callable[[], None]]) -> None:
    """Run the jobs concurrently with one intra-op thread each; the caller's thread takes the first."""
    with _run_lock:
        _run_locked(jobs)


def _run_locked(jobs: list[Callable[[], None]]) -> None:
    global _pool, _pool_size
    if _pool is None or _pool_size < len(jobs) - 1:
        _pool_size = max(1, len(jobs) - 1)
        _pool = ThreadPoolExecutor(max_workers=_pool_size, thread_name_prefix="expert-gemm")
    previous = torch.get_num_threads()
    inference = torch.is_inference_mode_enabled()  # thread-local, like grad mode: carried into the helpers

    def single_threaded(job: Callable[[], None]) -> None:
        _active.inside = True
        torch.set_num_threads(1)  # this thread's OpenMP team; MKL's count is process-wide (set below)
        try:
            # the callers are custom-op implementations (below autograd): nothing here is recorded
            with torch.inference_mode(inference), torch.no_grad():
                job()
        finally:
            _active.inside = False

    torch.set_num_threads(1)
    try:
        futures = [_pool.submit(single_threaded, job) for job in jobs[1:]]
        single_threaded(jobs[0])
        for future in futures:
            future.result()
    finally:
        torch.set_num_threads(previous)


def threaded_grouped_mm(grouped_mm: Callable, a: Tensor, b: Tensor, offsets_i32: Tensor) -> Optional[Tensor]:
    """``[P, K] x [E, K, N] -> [P, N]`` (rows of expert e times ``b[e]``), split across threads by expert; None
    when the serial ``grouped_mm(a, b, offs=offsets_i32)`` should run instead. ``offsets_i32``: inclusive ends."""
    workers = _workers(2 * a.shape[0] * a.shape[1] * b.shape[2], b.shape[0], a.device)
    if not workers:
        return None
    offsets = offsets_i32.tolist()
    out = a.new_empty(a.shape[0], b.shape[2])

    def job(e0: int, e1: int) -> Callable[[], None]:
        r0, r1 = (offsets[e0 - 1] if e0 else 0), offsets[e1 - 1]

        def run() -> None:
            if r1 > r0:
                out[r0:r1] = grouped_mm(a[r0:r1], b[e0:e1], offs=(offsets_i32[e0:e1] - r0).to(torch.int32))
        return run

    _run([job(e0, e1) for e0, e1 in _expert_blocks(offsets, workers)])
    return out


def threaded_grouped_mm_wgrad(grouped_mm: Callable, at: Tensor, dy: Tensor, offsets_i32: Tensor,
                              num_experts: int) -> Optional[Tensor]:
    """``[K, P] x [P, N] -> [E, K, N]`` (expert e: its rows' ``atᵀ``-columns times ``dy`` rows, zeros if none),
    split across threads by expert; None when the serial ``grouped_mm(at, dy, offs=offsets_i32)`` should run."""
    workers = _workers(2 * at.shape[0] * at.shape[1] * dy.shape[1], num_experts, at.device)
    if not workers:
        return None
    offsets = offsets_i32.tolist()
    out = at.new_empty(num_experts, at.shape[0], dy.shape[1])

    def job(e0: int, e1: int) -> Callable[[], None]:
        r0, r1 = (offsets[e0 - 1] if e0 else 0), offsets[e1 - 1]

        def run() -> None:
            if r1 > r0:
                out[e0:e1] = grouped_mm(at[:, r0:r1], dy[r0:r1], offs=(offsets_i32[e0:e1] - r0).to(torch.int32))
            else:
                out[e0:e1].zero_()
        return run

    _run([job(e0, e1) for e0, e1 in _expert_blocks(offsets, workers)])
    return out
