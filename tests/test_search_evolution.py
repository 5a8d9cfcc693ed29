"""search.evolution with a deterministic synthetic measurement: fixed-seed determinism, a true non-dominated front,
constraints applied before measuring, and a resumed (or interrupted) search reusing its cache."""
import itertools
import math

import pytest

from moduleformer_exit.search.evolution import EvolutionSettings, MeasurementCache, evolution_search
from moduleformer_exit.search.objectives import Constraints, evaluate, objective_names
from moduleformer_exit.search.space import space_from_dict

SPACE = {
    "fixed": {"vocab_size": 64, "gating_size": 8},
    "dimensions": {"n_layer": {"min": 1, "max": 6}, "n_embd": {"min": 16, "max": 64, "step": 16},
                   "n_head": [1, 2, 4], "att_hidden": [8, 16], "ffd_hidden": [16, 32, 64],
                   "n_att_experts": [1, 2, 4, 8], "k_att": [1, 2], "n_mlp_experts": [2, 4, 8], "k_mlp": [1, 2]},
}


class SyntheticMeasure:
    """A deterministic stand-in for on-device measurement (latency and memory from the config); counts calls."""

    def __init__(self, fail_after=None):
        self.calls = 0
        self.fail_after = fail_after

    def __call__(self, config, exits):
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise KeyboardInterrupt("simulated interrupt")
        self.calls += 1
        work = config.n_layer * (config.k_att * config.att_hidden + config.k_mlp * config.ffd_hidden) * config.n_embd
        weights = 4 * config.n_layer * config.n_embd * (config.n_att_experts * config.att_hidden
                                                        + config.n_mlp_experts * config.ffd_hidden)
        out = {"decode_ms": 0.1 + work / 1e5 + 0.01 * math.sin(config.n_embd + config.n_head),
               "prefill_ms": 1.0, "peak_memory_mb": weights / 2**20 + 0.5, "param_bytes": weights}
        if exits:
            out["exit_decode_ms"] = [out["decode_ms"] * (i + 1) / config.n_layer for i in range(config.n_layer)]
        return out


def _run(tmp_path, seed=1, candidates=30, measure=None, cache_name="cache.jsonl", constraints=Constraints(),
         exits=False):
    space = space_from_dict(SPACE, include_exits=exits)
    measure = measure or SyntheticMeasure()
    names, higher = objective_names(space, "non_embedding")
    cache = MeasurementCache(str(tmp_path / cache_name) if cache_name else None, "settings-1")
    rows, front = evolution_search(
        space, lambda arch, cached: evaluate(arch, space, constraints, measure, cached), names, higher,
        EvolutionSettings(candidates=candidates, seed=seed), cache, progress=False)
    return rows, front, names, higher, measure, cache


def _dominates(a, b, higher):
    no_worse = all((x >= y) if h else (x <= y) for x, y, h in zip(a, b, higher))
    return no_worse and any((x > y) if h else (x < y) for x, y, h in zip(a, b, higher))


def test_fixed_seed_is_deterministic_and_seeds_differ(tmp_path):
    first = _run(tmp_path, seed=3, cache_name=None)[0]
    second = _run(tmp_path, seed=3, cache_name=None)[0]
    other = _run(tmp_path, seed=4, cache_name=None)[0]
    assert [r["id"] for r in first] == [r["id"] for r in second]
    assert first == second
    assert [r["id"] for r in first] != [r["id"] for r in other]
    assert len(first) == 30 and len({r["id"] for r in first}) == 30  # deduplicated by id


@pytest.mark.parametrize("exits", [False, True])
def test_front_is_exactly_the_non_dominated_set(tmp_path, exits):
    rows, front, names, higher, _, _ = _run(tmp_path, candidates=40, cache_name=None, exits=exits)
    points = [[row[n] for n in names] for row in rows]
    brute = [i for i, p in enumerate(points) if not any(_dominates(q, p, higher) for q in points)]
    assert sorted(front) == brute
    assert rows[-1]["iteration"] > 0  # evolution ran past the random initial population


def test_constraints_reject_before_measuring(tmp_path):
    limit = 20_000
    rows, front, *_, measure, _ = _run(tmp_path, cache_name=None, constraints=Constraints(max_params=limit))
    rejected = [r for r in rows if not r["feasible"]]
    assert rejected and all("max_params" in r["infeasible_reason"] for r in rejected)
    assert all("decode_ms" not in r for r in rejected)  # never measured
    assert measure.calls == len(rows) - len(rejected)
    assert all(rows[i]["total"] <= limit for i in front)


def test_resumed_search_reuses_cache(tmp_path):
    rows_a, _, _, _, measure_a, _ = _run(tmp_path, candidates=12)
    assert measure_a.calls == 12
    rows_b, _, _, _, measure_b, cache_b = _run(tmp_path, candidates=20)
    assert [r["id"] for r in rows_b[:12]] == [r["id"] for r in rows_a]  # same seed replays the same search
    assert cache_b.hits == 12 and measure_b.calls == 8
    full = _run(tmp_path, candidates=20, cache_name="fresh.jsonl")[0]
    assert rows_b == full  # resuming changes nothing


def test_interrupted_search_resumes_from_cache(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path, candidates=15, measure=SyntheticMeasure(fail_after=6))
    rows, _, _, _, measure, cache = _run(tmp_path, candidates=15)
    assert cache.hits == 6 and measure.calls == 9
    with open(tmp_path / "cache.jsonl") as handle:  # a cut last line is ignored, not fatal
        text = handle.read()
    (tmp_path / "cache.jsonl").write_text(text + '{"id": "cut')
    assert len(MeasurementCache(str(tmp_path / "cache.jsonl"), "settings-1").entries) == 15
    assert MeasurementCache(str(tmp_path / "cache.jsonl"), "other-settings").entries == {}


def test_pairwise_brute_force_helper_sanity():
    assert _dominates([2, 1], [1, 1], [True, False]) and not _dominates([1, 1], [1, 1], [True, False])
    assert all(not _dominates(a, b, [False]) for a, b in itertools.permutations([[1], [1]]))
