"""Pareto dominance and non-dominated sorting (NSGA-II's fast sort, vectorised over the dominance matrix)."""
from __future__ import annotations

from typing import Sequence

import numpy as np


def _as_minimised(points: np.ndarray, higher_is_better: Sequence[bool] | None) -> np.ndarray:
    values = np.asarray(points, dtype=np.float64)
    if values.ndim != 2:
        raise ValueError(f"points must be a 2-D [N, M] array of objective values, got shape {values.shape}")
    if not np.isfinite(values).all():
        raise ValueError("points contain NaN or infinite objective values: drop or fix those candidates first")
    if higher_is_better is not None:
        if len(higher_is_better) != values.shape[1]:
            raise ValueError(f"higher_is_better has {len(higher_is_better)} entries for {values.shape[1]} objectives")
        values = np.where(np.asarray(higher_is_better, dtype=bool), -values, values)
    return values


def dominance_matrix(points: np.ndarray, higher_is_better: Sequence[bool] | None = None) -> np.ndarray:
    """``D[i, j]`` is True when point i dominates point j: no worse in every objective and better in one.

    Args:
        points: ``[N, M]`` objective values.
        higher_is_better: ``M`` flags (default: every objective is minimised).
    Returns:
        ``[N, N]`` bool.
    """
    values = _as_minimised(points, higher_is_better)
    no_worse = (values[:, None, :] <= values[None, :, :]).all(-1)
    better = (values[:, None, :] < values[None, :, :]).any(-1)
    return no_worse & better


def non_dominated_sort(points: np.ndarray, higher_is_better: Sequence[bool] | None = None) -> list[list[int]]:
    """Split ``[N, M]`` points into fronts: front 0 is the non-dominated set, front 1 is non-dominated once front 0
    is removed, and so on. Returns lists of row indices (ascending); equal points share a front."""
    dominates = dominance_matrix(points, higher_is_better)
    remaining = np.ones(dominates.shape[0], dtype=bool)
    dominated_by = dominates.sum(0)  # how many points dominate each point
    fronts = []
    while remaining.any():
        front = np.flatnonzero(remaining & (dominated_by == 0))
        fronts.append(front.tolist())
        remaining[front] = False
        dominated_by = dominated_by - dominates[front].sum(0)
    return fronts


def pareto_front(points: np.ndarray, higher_is_better: Sequence[bool] | None = None) -> list[int]:
    """Row indices of the non-dominated points of ``[N, M]`` ``points`` (empty input -> empty list)."""
    if len(points) == 0:
        return []
    return non_dominated_sort(points, higher_is_better)[0]
