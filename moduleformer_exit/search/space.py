"""The architecture search space: which ModuleFormer shapes the search may pick, and how it samples, mutates and
crosses them (archai's ``TransformerFlexSearchSpace`` ideas, for ModuleFormer's sparse dimensions).

A space is read from JSON (``default_space.json`` ships with the package)::

    {"fixed": {ModuleFormerConfig fields shared by every candidate, e.g. "vocab_size": 2048},
     "dimensions": {"n_layer": {"min": 2, "max": 8, "step": 1}, "n_head": {"choices": [1, 2, 4]}, ...},
     "exits": {"min_layer": 1},                     # used with include_exits: the exit layer is a dimension
     "pruning": {"keep_fractions": [0.5, 1.0]}}     # used with include_pruning: experts kept is a dimension

Every one of ``DIMENSIONS`` must be given. A candidate is valid when ``k_att <= n_att_experts``,
``k_mlp <= n_mlp_experts`` and ``n_head`` divides ``att_hidden``; sampling, mutation and crossover always return
valid candidates (dependent dimensions are re-drawn among the values that fit).
"""
from __future__ import annotations

import hashlib
import json
import math
import random
from dataclasses import asdict, dataclass, field
from importlib.resources import files
from typing import Any, Optional

from ..configuration import ModuleFormerConfig

DIMENSIONS = ("n_layer", "n_embd", "n_head", "att_hidden", "ffd_hidden", "n_att_experts", "k_att", "n_mlp_experts",
              "k_mlp")


class SearchSpaceError(ValueError):
    """The search-space JSON cannot describe any valid architecture; the message names the field and the fix."""


@dataclass(frozen=True)
class Architecture:
    """One candidate: the nine searched ModuleFormer sizes, plus the optional exit layer and expert keep fraction."""

    n_layer: int
    n_embd: int
    n_head: int
    att_hidden: int
    ffd_hidden: int
    n_att_experts: int
    k_att: int
    n_mlp_experts: int
    k_mlp: int
    exit_layer: Optional[int] = None
    keep_fraction: Optional[float] = None

    def to_dict(self) -> dict[str, Any]:
        """The set fields (``None`` ones left out), sorted by name."""
        return {k: v for k, v in sorted(asdict(self).items()) if v is not None}

    @property
    def arch_id(self) -> str:
        """Stable id: the first 16 hex digits of the SHA-1 of the sorted-key JSON of :meth:`to_dict`."""
        text = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha1(text.encode()).hexdigest()[:16]

    @property
    def kept_experts(self) -> tuple[int, int]:
        """(attention, MLP) experts kept per layer after pruning: ``max(k, ceil(keep_fraction * n))``."""
        if self.keep_fraction is None:
            return self.n_att_experts, self.n_mlp_experts
        return (max(self.k_att, math.ceil(self.keep_fraction * self.n_att_experts)),
                max(self.k_mlp, math.ceil(self.keep_fraction * self.n_mlp_experts)))

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "Architecture":
        return cls(**values)


def _parse_dimension(name: str, spec: Any) -> tuple[int, ...]:
    """``{"min", "max", "step"}`` or ``{"choices": [...]}`` (or a bare list) -> sorted distinct positive ints."""
    if isinstance(spec, list):
        spec = {"choices": spec}
    if not isinstance(spec, dict):
        raise SearchSpaceError(f"dimension {name!r} must be {{'min', 'max', 'step'}} or {{'choices': [...]}}, "
                               f"got {spec!r}")
    if "choices" in spec:
        values = spec["choices"]
        if not isinstance(values, list) or not values:
            raise SearchSpaceError(f"dimension {name!r} has an empty 'choices' list: give at least one value")
    else:
        missing = [k for k in ("min", "max") if k not in spec]
        if missing:
            raise SearchSpaceError(f"dimension {name!r} lacks {missing}: give 'min' and 'max' (and 'step') or "
                                   f"'choices'")
        low, high, step = spec["min"], spec["max"], spec.get("step", 1)
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in (low, high, step)) or step <= 0:
            raise SearchSpaceError(f"dimension {name!r}: min, max and step must be integers with step > 0, got "
                                   f"{spec!r}")
        if low > high:
            raise SearchSpaceError(f"dimension {name!r} is an empty range (min {low} > max {high}): swap them or "
                                   f"widen the range")
        values = list(range(low, high + 1, step))
    bad = [v for v in values if isinstance(v, bool) or not isinstance(v, int) or v <= 0]
    if bad:
        raise SearchSpaceError(f"dimension {name!r} has values {bad} that are not positive integers")
    return tuple(sorted(set(values)))


@dataclass
class SearchSpace:
    """Choices per dimension, the fixed config fields, and whether exits / pruning are searched too."""

    dimensions: dict[str, tuple[int, ...]]
    fixed: dict[str, Any] = field(default_factory=dict)
    include_exits: bool = False
    include_pruning: bool = False
    min_exit_layer: int = 1
    keep_fractions: tuple[float, ...] = (0.25, 0.5, 0.75, 1.0)

    def __post_init__(self) -> None:
        self.validate()

    # ------------------------------------------------------------------------------------------ validation
    def validate(self) -> None:
        """Raise :class:`SearchSpaceError` if a dimension is missing or empty, or a choice can never be valid."""
        unknown = sorted(set(self.dimensions) - set(DIMENSIONS))
        if unknown:
            raise SearchSpaceError(f"unknown search dimension(s) {unknown}; the dimensions are {list(DIMENSIONS)}")
        missing = [d for d in DIMENSIONS if d not in self.dimensions]
        if missing:
            raise SearchSpaceError(f"the search space lacks dimension(s) {missing}: give each of {list(DIMENSIONS)}")
        for name in DIMENSIONS:
            if not self.dimensions[name]:
                raise SearchSpaceError(f"dimension {name!r} has no values: give at least one")
        dims = self.dimensions
        for k_name, e_name in (("k_att", "n_att_experts"), ("k_mlp", "n_mlp_experts")):
            too_big = [k for k in dims[k_name] if k > max(dims[e_name])]
            if too_big:
                raise SearchSpaceError(
                    f"{k_name} choice(s) {too_big} exceed every {e_name} choice (max {max(dims[e_name])}): a token "
                    f"cannot use more experts than exist. Lower {k_name} or allow more {e_name}.")
        for heads in dims["n_head"]:
            if not any(width % heads == 0 for width in dims["att_hidden"]):
                raise SearchSpaceError(
                    f"n_head choice {heads} divides no att_hidden choice {list(dims['att_hidden'])}: each attention "
                    f"expert splits att_hidden into n_head heads. Use att_hidden multiples of {heads} or drop it.")
        for width in dims["att_hidden"]:
            if not any(width % heads == 0 for heads in dims["n_head"]):
                raise SearchSpaceError(
                    f"att_hidden choice {width} is divisible by no n_head choice {list(dims['n_head'])}: pick "
                    f"att_hidden multiples of an n_head choice.")
        if self.include_exits and self.min_exit_layer >= max(dims["n_layer"]):
            raise SearchSpaceError(f"exits.min_layer ({self.min_exit_layer}) must be below the largest n_layer "
                                   f"({max(dims['n_layer'])}) so an exit before the last layer exists")
        if self.include_pruning and (not self.keep_fractions or not all(0 < f <= 1 for f in self.keep_fractions)):
            raise SearchSpaceError(f"pruning.keep_fractions must be a non-empty list in (0, 1], got "
                                   f"{list(self.keep_fractions)}")
        for key in self.fixed:
            if key in DIMENSIONS:
                raise SearchSpaceError(f"{key!r} is both fixed and searched: remove it from 'fixed' or 'dimensions'")
        self.to_config(self.smallest())  # the fixed fields must build a config

    def smallest(self) -> Architecture:
        """The valid architecture with the smallest value in every dimension that allows it."""
        d = {name: values[0] for name, values in self.dimensions.items()}
        return self._repair(d, random.Random(0), prefer_small=True)

    # ------------------------------------------------------------------------------------------ candidates
    def is_valid(self, arch: Architecture) -> bool:
        """Whether ``arch`` lies in this space and satisfies the constraints."""
        values = asdict(arch)
        if any(values[name] not in self.dimensions[name] for name in DIMENSIONS):
            return False
        if arch.k_att > arch.n_att_experts or arch.k_mlp > arch.n_mlp_experts or arch.att_hidden % arch.n_head:
            return False
        if self.include_exits != (arch.exit_layer is not None) or self.include_pruning != (arch.keep_fraction
                                                                                           is not None):
            return False
        if arch.exit_layer is not None and not self.min_exit_layer <= arch.exit_layer < arch.n_layer:
            return False
        return arch.keep_fraction is None or arch.keep_fraction in self.keep_fractions

    def _repair(self, values: dict[str, Any], rng: random.Random, prefer_small: bool = False) -> Architecture:
        """Re-draw the dependent dimensions of ``values`` that break a constraint (k, n_head, exit layer)."""
        def pick(options):
            return options[0] if prefer_small else rng.choice(options)

        dims = self.dimensions
        for k_name, e_name in (("k_att", "n_att_experts"), ("n_head", "att_hidden"), ("k_mlp", "n_mlp_experts")):
            if k_name == "n_head":
                if values["att_hidden"] % values["n_head"]:
                    widths = [w for w in dims["att_hidden"] if w % values["n_head"] == 0]
                    heads = [h for h in dims["n_head"] if values["att_hidden"] % h == 0]
                    if heads:
                        values["n_head"] = pick(heads)
                    else:
                        values["att_hidden"] = pick(widths)
            elif values[k_name] > values[e_name]:
                ks = [k for k in dims[k_name] if k <= values[e_name]]
                if ks:
                    values[k_name] = pick(ks)
                else:
                    values[e_name] = pick([e for e in dims[e_name] if e >= values[k_name]])
        values.setdefault("exit_layer", None)
        values.setdefault("keep_fraction", None)
        if self.include_exits:
            layer = values["exit_layer"]
            options = list(range(self.min_exit_layer, values["n_layer"]))
            if not options:  # this depth has no exit before the last layer: take a deeper model
                values["n_layer"] = pick([n for n in dims["n_layer"] if n > self.min_exit_layer])
                options = list(range(self.min_exit_layer, values["n_layer"]))
            if layer is None or layer not in options:
                values["exit_layer"] = pick(options)
        else:
            values["exit_layer"] = None
        if self.include_pruning:
            if values["keep_fraction"] not in self.keep_fractions:
                values["keep_fraction"] = pick(sorted(self.keep_fractions))
        else:
            values["keep_fraction"] = None
        return Architecture(**values)

    def sample(self, rng: random.Random) -> Architecture:
        """A uniformly drawn valid architecture (dependent dimensions re-drawn among the values that fit)."""
        values: dict[str, Any] = {name: rng.choice(self.dimensions[name]) for name in DIMENSIONS}
        if self.include_exits:
            values["exit_layer"] = None
        if self.include_pruning:
            values["keep_fraction"] = rng.choice(sorted(self.keep_fractions))
        return self._repair(values, rng)

    def mutate(self, arch: Architecture, rng: random.Random, prob: float = 0.3) -> Architecture:
        """Re-draw each dimension of ``arch`` with probability ``prob`` (archai's mutation), then repair."""
        values = asdict(arch)
        for name in DIMENSIONS:
            if rng.random() < prob:
                values[name] = rng.choice(self.dimensions[name])
        if self.include_exits and rng.random() < prob:
            values["exit_layer"] = None
        if self.include_pruning and rng.random() < prob:
            values["keep_fraction"] = rng.choice(sorted(self.keep_fractions))
        return self._repair(values, rng)

    def crossover(self, first: Architecture, second: Architecture, rng: random.Random) -> Architecture:
        """Each dimension taken from one parent at random (uniform crossover), then repaired."""
        a, b = asdict(first), asdict(second)
        values = {name: (a if rng.random() < 0.5 else b)[name] for name in a}
        return self._repair(values, rng)

    # ------------------------------------------------------------------------------------------ configs
    def to_config(self, arch: Architecture, pruned: bool = False) -> ModuleFormerConfig:
        """The ``ModuleFormerConfig`` of ``arch`` (with ``pruned``: the expert counts kept after pruning)."""
        values = {name: getattr(arch, name) for name in DIMENSIONS}
        if pruned:
            values["n_att_experts"], values["n_mlp_experts"] = arch.kept_experts
        return ModuleFormerConfig(**{**self.fixed, **values})

    def to_json(self) -> dict[str, Any]:
        """A JSON form that :func:`space_from_dict` reads back (choices listed explicitly)."""
        return {"fixed": dict(self.fixed), "dimensions": {k: {"choices": list(v)} for k, v in self.dimensions.items()},
                "exits": {"min_layer": self.min_exit_layer}, "pruning": {"keep_fractions": list(self.keep_fractions)}}


def space_from_dict(raw: dict[str, Any], include_exits: bool = False, include_pruning: bool = False) -> SearchSpace:
    """Build and validate a :class:`SearchSpace` from the JSON form described in the module docstring."""
    if not isinstance(raw, dict) or not isinstance(raw.get("dimensions"), dict):
        raise SearchSpaceError("a search space is a JSON object with a 'dimensions' object (see default_space.json)")
    unknown = sorted(set(raw) - {"fixed", "dimensions", "exits", "pruning"})
    if unknown:
        raise SearchSpaceError(f"unknown search-space key(s) {unknown}; use fixed, dimensions, exits, pruning")
    dims = {name: _parse_dimension(name, spec) for name, spec in raw["dimensions"].items()}
    fixed = dict(raw.get("fixed", {}))
    exits = raw.get("exits", {})
    pruning = raw.get("pruning", {})
    return SearchSpace(dims, fixed, include_exits, include_pruning, int(exits.get("min_layer", 1)),
                       tuple(float(f) for f in pruning.get("keep_fractions", (0.25, 0.5, 0.75, 1.0))))


def load_space(path: Optional[str] = None, include_exits: bool = False, include_pruning: bool = False) -> SearchSpace:
    """Read a search-space JSON file (``None``: the bundled ``default_space.json``)."""
    text = (files("moduleformer_exit.search") / "default_space.json").read_text() if path is None else None
    if text is None:
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as error:
        raise SearchSpaceError(f"search space {path} is not valid JSON: {error}") from None
    return space_from_dict(raw, include_exits, include_pruning)


__all__ = ["Architecture", "DIMENSIONS", "SearchSpace", "SearchSpaceError", "load_space", "space_from_dict"]
