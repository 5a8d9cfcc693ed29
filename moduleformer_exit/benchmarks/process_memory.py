"""Resident memory of the current process, for the benchmarks that report memory per process (training, expert
parallelism). Linux ``/proc`` and ``getrusage``: the figures are the kernel's, not an allocator's estimate."""
from __future__ import annotations

import os


def rss_mb() -> float:
    """Current resident set size of this process, MiB."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, MiB (``ru_maxrss`` is in KiB on Linux)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
