"""Which experts to keep: a budget (fraction or count; uniform per layer or one global budget spread over layers by
score) applied to per-expert scores from a usage statistic, or a seeded random choice (the baseline)."""
from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch
from torch import Tensor

Budget = Union[float, int]
SCORE_CRITERIA = {"frequency": "counts", "gate-mass": "gate_mass", "contribution": "contribution"}


def parse_budget(text: str) -> Budget:
    """CLI budget: ``"0.5"`` (a fraction, has a point) or ``"4"`` (an expert count)."""
    try:
        value = float(text) if any(c in text for c in ".eE") else int(text)
    except ValueError:
        raise ValueError(f"budget {text!r} is neither a fraction like 0.5 nor an expert count like 4.") from None
    return value


def layer_keep_counts(counts: Sequence[int], budget: Budget, top_k: int) -> list[int]:
    """Experts to keep per layer for a uniform budget: ``round(fraction * E_l)`` or the count itself.

    Raises ``ValueError`` for a fraction outside (0, 1], a count above a layer's experts, or a result below ``top_k``.
    """
    if isinstance(budget, float):
        if not 0.0 < budget <= 1.0:
            raise ValueError(f"a keep fraction must be in (0, 1], got {budget}.")
        keep = [max(1, math.floor(budget * e + 0.5)) for e in counts]
    else:
        if budget < 1 or budget > min(counts):
            raise ValueError(f"a keep count must be in [1, {min(counts)}] (the fewest experts of any layer), got "
                             f"{budget}.")
        keep = [budget] * len(counts)
    for layer, n in enumerate(keep):
        if n < top_k:
            raise ValueError(f"the budget {budget} keeps {n} experts in layer {layer} but each token uses k={top_k}: "
                             f"keep at least {top_k} per layer (raise the budget or lower k).")
    return keep


def random_scores(counts: Sequence[int], seed: int) -> list[Tensor]:
    """Seeded uniform random scores ``[E_l]`` per layer (the random-pruning baseline)."""
    generator = torch.Generator().manual_seed(seed)
    return [torch.rand(e, generator=generator, dtype=torch.float64) for e in counts]


def _top(scores: Tensor, n: int) -> list[int]:
    order = torch.sort(scores, descending=True, stable=True).indices  # ties: lower id first
    return sorted(order[:n].tolist())


def select_by_scores(scores: Sequence[Tensor], budget: Budget, top_k: int, spread: str = "uniform") -> list[list[int]]:
    """Kept expert ids per layer (ascending): the highest-scoring experts.

    Args:
        scores: per-layer ``[E_l]`` scores, higher = more important.
        budget: fraction of experts (float) or count (int); per layer with ``spread="uniform"``, over all layers with
            ``spread="global"`` (scores normalised to sum 1 within each layer so layers compare; every layer keeps
            at least ``top_k``).
    """
    counts = [int(s.numel()) for s in scores]
    if spread == "uniform":
        return [_top(s, n) for s, n in zip(scores, layer_keep_counts(counts, budget, top_k))]
    if spread != "global":
        raise ValueError(f"spread must be 'uniform' or 'global', got {spread!r}.")
    total_experts = sum(counts)
    total = (max(1, math.floor(budget * total_experts + 0.5)) if isinstance(budget, float) else int(budget))
    if isinstance(budget, float) and not 0.0 < budget <= 1.0:
        raise ValueError(f"a keep fraction must be in (0, 1], got {budget}.")
    if not top_k * len(counts) <= total <= total_experts:
        raise ValueError(f"a global budget of {total} experts cannot keep k={top_k} in each of {len(counts)} layers "
                         f"(needs {top_k * len(counts)}..{total_experts}).")
    normalised = [s.clamp(min=0) / s.clamp(min=0).sum() if float(s.clamp(min=0).sum()) > 0
                  else torch.full_like(s, 1.0 / s.numel()) for s in scores]
    kept = [set(_top(s, top_k)) for s in normalised]  # the guaranteed top-k of every layer
    rest = [(float(s[e]), -layer, -e, layer, e) for layer, s in enumerate(normalised) for e in range(s.numel())
            if e not in kept[layer]]
    rest.sort(reverse=True)
    for *_, layer, e in rest[: total - top_k * len(counts)]:
        kept[layer].add(e)
    return [sorted(k) for k in kept]


def scores_for(criterion: str, usage, kind: str, counts: Sequence[int], seed: int = 0) -> list[Tensor]:
    """Per-layer scores of a score-based criterion (``frequency`` / ``gate-mass`` / ``contribution`` from an
    :class:`~moduleformer_exit.pruning.usage.ExpertUsage`, or ``random``)."""
    if criterion == "random":
        return random_scores(counts, seed)
    if criterion not in SCORE_CRITERIA:
        raise ValueError(f"criterion {criterion!r} is not score-based; choose from "
                         f"{', '.join(list(SCORE_CRITERIA) + ['random'])}.")
    if usage is None:
        raise ValueError(f"criterion {criterion!r} needs expert usage (collect it on calibration data first).")
    return usage.scores(SCORE_CRITERIA[criterion], kind)
