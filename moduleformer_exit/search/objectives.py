"""The search objectives of one candidate: training-free quality proxies (from ``accounting``), on-device costs
(from ``measure``), the constraints checked before and after measuring, and the objective vector the front uses.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable, Optional

from ..accounting import flops_per_token, parameter_counts
from ..configuration import ModuleFormerConfig
from .space import Architecture, SearchSpace

# Proxies (higher = expected lower perplexity). ``validate-proxy`` ranks them; DEFAULT_PROXY is its winner
# (README, "Architecture search").
PROXIES = ("total", "non_embedding", "active", "active_non_embedding", "forward_flops")
DEFAULT_PROXY = "active"


def proxies_of(config: ModuleFormerConfig) -> dict[str, int]:
    """Every proxy of ``config``: the parameter counts and forward FLOPs per token at context ``block_size // 2``."""
    counts = parameter_counts(config)
    out = {name: counts[name] for name in PROXIES if name in counts}
    out["forward_flops"] = flops_per_token(config, max(1, config.block_size // 2))["forward"]
    return out


def truncated(config: ModuleFormerConfig, n_layer: int) -> ModuleFormerConfig:
    """``config`` cut to its first ``n_layer`` blocks (what an exit at layer ``n_layer`` computes)."""
    cut = copy.deepcopy(config)
    cut.n_layer = n_layer
    return cut


@dataclass(frozen=True)
class Constraints:
    """Upper bounds; ``None`` = unbounded. Parameter and memory bounds are checked before measuring (memory is at
    least the weights' bytes), the latency bound after."""

    max_latency_ms: Optional[float] = None
    max_memory_mb: Optional[float] = None
    max_params: Optional[int] = None

    def before_measuring(self, total_params: int, param_bytes: int) -> Optional[str]:
        """The reason a candidate is infeasible without measuring it, or None."""
        if self.max_params is not None and total_params > self.max_params:
            return f"total parameters {total_params:,} > max_params {self.max_params:,}"
        if self.max_memory_mb is not None and param_bytes / 2**20 > self.max_memory_mb:
            return f"weights alone take {param_bytes / 2**20:.1f} MiB > max_memory_mb {self.max_memory_mb}"
        return None

    def after_measuring(self, measured: dict) -> Optional[str]:
        if self.max_latency_ms is not None and measured["decode_ms"] > self.max_latency_ms:
            return f"decode {measured['decode_ms']:.2f} ms/token > max_latency_ms {self.max_latency_ms}"
        if self.max_memory_mb is not None and measured["peak_memory_mb"] > self.max_memory_mb:
            return f"peak memory {measured['peak_memory_mb']:.1f} MiB > max_memory_mb {self.max_memory_mb}"
        return None


def objective_names(space: SearchSpace, proxy: str) -> tuple[list[str], list[bool]]:
    """Names of the front's objectives and whether higher is better for each."""
    names, higher = [proxy, "decode_ms", "peak_memory_mb"], [True, False, False]
    if space.include_exits:
        names += [f"exit_{proxy}", "exit_decode_ms"]
        higher += [True, False]
    return names, higher


Measure = Callable[[ModuleFormerConfig, bool], dict]


def evaluate(arch: Architecture, space: SearchSpace, constraints: Constraints, measure: Measure,
             cached: Optional[dict] = None) -> tuple[dict, Optional[dict]]:
    """One candidate's row: its sizes, every proxy, its measurements (``cached`` ones reused) and feasibility.

    ``measure(config, exits)`` returns ``measure.measure_config``'s dict. With pruning the deployed (pruned) config
    is the one measured and scored. Returns ``(row, measured)``; ``measured`` is None when a pre-measurement
    constraint rejected the candidate.
    """
    config = space.to_config(arch, pruned=space.include_pruning)
    proxies = proxies_of(config)
    row = {"id": arch.arch_id, **arch.to_dict(), **proxies}
    if space.include_pruning:
        row["kept_att_experts"], row["kept_mlp_experts"] = arch.kept_experts
    reason = constraints.before_measuring(proxies["total"], 4 * proxies["total"])
    measured = None
    if reason is None:
        measured = cached if cached is not None else measure(config, space.include_exits)
        # RSS growth can read slightly below the weights when the allocator reuses pages it kept: weights bound it.
        row.update({k: v for k, v in measured.items() if k != "exit_decode_ms"})
        row["peak_memory_mb"] = max(measured["peak_memory_mb"], measured["param_bytes"] / 2**20)
        if space.include_exits:
            row["exit_decode_ms"] = measured["exit_decode_ms"][arch.exit_layer - 1]
            row["exit_decode_ms_by_layer"] = list(measured["exit_decode_ms"])
            row.update({f"exit_{k}": v for k, v in proxies_of(truncated(config, arch.exit_layer)).items()})
        reason = constraints.after_measuring(row)
    row["feasible"] = reason is None
    row["infeasible_reason"] = reason or ""
    return row, measured
