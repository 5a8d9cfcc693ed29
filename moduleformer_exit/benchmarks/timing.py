"""The benchmarks' one timing helper and the guard that puts process-wide settings back.

:func:`time_calls` runs several callables interleaved (A, B, A, B, ...) so machine noise hits them alike and returns
every call's milliseconds: CUDA events around each call on a GPU, ``perf_counter`` on CPU. :func:`process_settings`
sets torch threads, flush-denormal and glibc's malloc thresholds for the duration of a benchmark and restores them.
"""
from __future__ import annotations

import contextlib
import ctypes
import time
from typing import Callable, Iterator, Mapping, Optional

import torch

__all__ = ["time_calls", "fastest_ms", "process_settings", "flush_denormal_enabled"]

GLIBC_DEFAULT_THRESHOLD = 128 * 1024  # M_MMAP_THRESHOLD / M_TRIM_THRESHOLD defaults (glibc mallopt(3))


def time_calls(fns: Mapping[str, Callable[[], object]], repeats: int, warmup: int = 1,
               cuda: Optional[bool] = None) -> dict[str, list[float]]:
    """``{name: [ms per call] * repeats}`` for every callable, run interleaved after ``warmup`` untimed rounds.

    ``cuda`` (default: CUDA initialized) times with CUDA events and one synchronize per call."""
    if cuda is None:
        cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    if cuda:
        torch.cuda.synchronize()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            if cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize()
                times[name].append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                fn()
                times[name].append((time.perf_counter() - t0) * 1e3)
    return times


def fastest_ms(fns: Mapping[str, Callable[[], object]], repeats: int, warmup: int = 1) -> dict[str, float]:
    """``{name: fastest ms}`` of :func:`time_calls` (interleaved): the least-disturbed run on a noisy machine."""
    return {name: min(ms) for name, ms in time_calls(fns, repeats, warmup).items()}


def flush_denormal_enabled() -> bool:
    """Whether denormal floats are flushed to zero right now (torch has no getter: a denormal times one)."""
    return float(torch.tensor([1e-40], dtype=torch.float32) * torch.tensor([1.0])) == 0.0


def _mallopt(threshold: int) -> bool:
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(-3, threshold)) and bool(libc.mallopt(-1, threshold))  # M_MMAP_, M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        return False


@contextlib.contextmanager
def process_settings(threads: Optional[int] = None, flush_denormal: Optional[bool] = None,
                     malloc_threshold: Optional[int] = None) -> Iterator[None]:
    """Set (where not None) torch's CPU threads, flush-denormal and glibc's mmap/trim thresholds for the block,
    then restore them: threads and flush-denormal to their previous values, the malloc thresholds to glibc's
    defaults (they cannot be read back; an explicit value also ends glibc's dynamic mmap threshold)."""
    old_threads, old_flush = torch.get_num_threads(), flush_denormal_enabled()
    try:
        if threads is not None:
            torch.set_num_threads(threads)
        if flush_denormal is not None:
            torch.set_flush_denormal(flush_denormal)
        if malloc_threshold is not None:
            _mallopt(malloc_threshold)
        yield
    finally:
        torch.set_num_threads(old_threads)
        torch.set_flush_denormal(old_flush)
        if malloc_threshold is not None:
            _mallopt(GLIBC_DEFAULT_THRESHOLD)
