"""search.pareto against a brute-force pairwise dominance check on synthetic points (ties and duplicates included)."""
import itertools

import numpy as np
import pytest

from moduleformer_exit.search.pareto import dominance_matrix, non_dominated_sort, pareto_front


def _dominates(a, b, higher):
    """Naive reference: a dominates b."""
    no_worse = all((x >= y) if h else (x <= y) for x, y, h in zip(a, b, higher))
    better = any((x > y) if h else (x < y) for x, y, h in zip(a, b, higher))
    return no_worse and better


def _brute_front(points, higher):
    return [i for i, p in enumerate(points) if not any(_dominates(q, p, higher) for q in points)]


@pytest.mark.parametrize("seed", range(6))
def test_front_equals_brute_force(seed):
    rng = np.random.default_rng(seed)
    n, m = rng.integers(1, 60), rng.integers(2, 5)
    points = rng.integers(0, 6, size=(n, m)).astype(float)  # a coarse grid forces ties and duplicate points
    higher = [bool(h) for h in rng.integers(0, 2, size=m)]
    assert pareto_front(points, higher) == _brute_front(points.tolist(), higher)
    matrix = dominance_matrix(points, higher)
    for i, j in itertools.product(range(n), repeat=2):
        assert matrix[i, j] == _dominates(points[i], points[j], higher)


@pytest.mark.parametrize("seed", range(4))
def test_sorted_fronts_are_successive_brute_force_fronts(seed):
    rng = np.random.default_rng(100 + seed)
    points = rng.normal(size=(40, 3)).round(1)
    higher = [True, False, False]
    remaining = list(range(len(points)))
    fronts = non_dominated_sort(points, higher)
    assert sorted(i for f in fronts for i in f) == list(range(len(points)))
    for front in fronts:  # peel the brute-force front off the remaining points, one layer at a time
        sub = [points[i].tolist() for i in remaining]
        expected = [remaining[j] for j in _brute_front(sub, higher)]
        assert front == expected
        remaining = [i for i in remaining if i not in expected]
    assert not remaining


def test_small_hand_example_and_errors():
    # (proxy up, latency down): (3, 1) dominates (2, 2) and (3, 2); (5, 4) and (1, 0) are trade-offs; duplicates stay.
    points = np.array([[3, 1], [2, 2], [5, 4], [1, 0], [3, 2], [5, 4]])
    assert pareto_front(points, [True, False]) == [0, 2, 3, 5]
    assert non_dominated_sort(points, [True, False]) == [[0, 2, 3, 5], [4], [1]]
    assert pareto_front(np.zeros((0, 2))) == []
    with pytest.raises(ValueError, match="NaN"):
        pareto_front(np.array([[1.0, float("nan")]]))
    with pytest.raises(ValueError, match="higher_is_better"):
        pareto_front(points, [True])
