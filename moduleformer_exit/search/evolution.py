"""Multi-objective evolutionary Pareto search (archai's ``EvolutionParetoSearch``) with a resumable measurement
cache.

Iteration 0 evaluates ``init_num_models`` random candidates. Each later iteration mutates every member of the current
Pareto front (``mutations_per_parent`` each, probability ``mutation_prob`` per dimension), crosses
``num_crossovers`` random pairs of front members, adds ``num_random_mix`` random samples, drops what was already
evaluated (by architecture id), and evaluates the rest, until ``candidates`` architectures are evaluated or
``max_iterations`` pass. Every random draw comes from one ``random.Random(seed)``, and a cached measurement replaces
a new one, so rerunning with the same seed and cache replays the same search and an interrupted one resumes where
it stopped.
"""
from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np

from .pareto import pareto_front
from .space import Architecture, SearchSpace


class MeasurementCache:
    """Append-only JSONL of measurements keyed by architecture id, valid for one ``settings_key`` only."""

    def __init__(self, path: Optional[str], settings_key: str) -> None:
        self.path = path
        self.settings_key = settings_key
        self.entries: dict[str, dict] = {}
        self.hits = 0
        if path is not None and os.path.isfile(path):
            with open(path, encoding="utf-8") as handle:
                for number, line in enumerate(handle, 1):
                    if not line.strip():
                        continue
                    try:
                        item = json.loads(line)
                    except json.JSONDecodeError:  # a line cut by an interrupt: ignore it, it is re-measured
                        continue
                    if item.get("settings") == settings_key:
                        self.entries[item["id"]] = item["measured"]

    def get(self, arch_id: str) -> Optional[dict]:
        found = self.entries.get(arch_id)
        if found is not None:
            self.hits += 1
        return found

    def put(self, arch_id: str, measured: dict) -> None:
        self.entries[arch_id] = measured
        if self.path is not None:
            with open(self.path, "a", encoding="utf-8") as handle:
                handle.write(json.dumps({"id": arch_id, "settings": self.settings_key, "measured": measured}) + "\n")
                handle.flush()
                os.fsync(handle.fileno())


@dataclass
class EvolutionSettings:
    """archai's defaults (``EvolutionParetoSearch``), the stopping budget and the seed."""

    candidates: int = 50
    init_num_models: int = 10
    max_iterations: Optional[int] = None
    mutations_per_parent: int = 1
    mutation_prob: float = 0.3
    num_crossovers: int = 5
    num_random_mix: int = 5
    seed: int = 1

    def __post_init__(self) -> None:
        if self.candidates < 1 or self.init_num_models < 1:
            raise ValueError(f"--candidates ({self.candidates}) and --init ({self.init_num_models}) must be >= 1")
        if not 0 <= self.mutation_prob <= 1:
            raise ValueError(f"--mutation-prob must be in [0, 1], got {self.mutation_prob}")


# evaluate(arch, cached_measurement_or_None) -> (row, measured_or_None)
Evaluate = Callable[[Architecture, Optional[dict]], tuple[dict, Optional[dict]]]


def front_of(rows: list[dict], names: list[str], higher_is_better: list[bool]) -> list[int]:
    """Indices into ``rows`` of the non-dominated feasible rows over the objectives ``names``."""
    feasible = [i for i, row in enumerate(rows) if row["feasible"]]
    if not feasible:
        return []
    points = np.array([[float(rows[i][n]) for n in names] for i in feasible])
    return [feasible[j] for j in pareto_front(points, higher_is_better)]


def evolution_search(space: SearchSpace, evaluate: Evaluate, names: list[str], higher_is_better: list[bool],
                     settings: EvolutionSettings, cache: MeasurementCache,
                     progress: bool = True) -> tuple[list[dict], list[int]]:
    """Run the search; returns (every evaluated row in evaluation order, indices of the final front's rows)."""
    from tqdm.auto import tqdm

    rng = random.Random(settings.seed)
    rows: list[dict] = []
    seen: set[str] = set()
    population = [space.sample(rng) for _ in range(settings.init_num_models)]
    bar = tqdm(total=settings.candidates, disable=not progress, desc="search", dynamic_ncols=True)
    iteration, stalled = 0, 0
    while len(rows) < settings.candidates:
        if settings.max_iterations is not None and iteration >= settings.max_iterations:
            break
        unseen = []
        for arch in population:
            if arch.arch_id not in seen:
                seen.add(arch.arch_id)
                unseen.append(arch)
        stalled = stalled + 1 if not unseen else 0
        if stalled >= 20:  # the space (or the constraints) leaves nothing new to try
            bar.write(f"search: no new architecture in 20 iterations, stopping at {len(rows)} candidates")
            break
        for arch in unseen[: settings.candidates - len(rows)]:
            cached = cache.get(arch.arch_id)
            row, measured = evaluate(arch, cached)
            if measured is not None and cached is None:
                cache.put(arch.arch_id, measured)
            row["iteration"] = iteration
            rows.append(row)
            bar.update(1)
        front = front_of(rows, names, higher_is_better)
        bar.set_postfix(front=len(front), cached=cache.hits, refresh=False)
        parents = [space_arch(rows[i]) for i in front] or [space.sample(rng)]
        population = []
        for parent in parents:
            population += [space.mutate(parent, rng, settings.mutation_prob)
                           for _ in range(settings.mutations_per_parent)]
        for _ in range(settings.num_crossovers):
            first, second = (rng.sample(parents, 2) if len(parents) > 1 else (parents[0], space.sample(rng)))
            population.append(space.crossover(first, second, rng))
        population += [space.sample(rng) for _ in range(settings.num_random_mix)]
        iteration += 1
    bar.close()
    return rows, front_of(rows, names, higher_is_better)


def space_arch(row: dict) -> Architecture:
    """The :class:`Architecture` a result row describes."""
    fields = Architecture.__dataclass_fields__
    return Architecture(**{k: row[k] for k in fields if k in row})
