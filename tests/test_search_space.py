"""search.space: invalid spaces rejected with a clear error; sample / mutate / crossover stay valid; stable ids."""
import copy
import hashlib
import json
import random

import pytest

from moduleformer_exit import ModuleFormerConfig
from moduleformer_exit.search.space import (DIMENSIONS, Architecture, SearchSpaceError, load_space,
                                            space_from_dict)

SPACE = {
    "fixed": {"vocab_size": 64, "gating_size": 8},
    "dimensions": {"n_layer": {"min": 2, "max": 4}, "n_embd": {"min": 16, "max": 48, "step": 16},
                   "n_head": {"choices": [1, 2, 4]}, "att_hidden": {"choices": [6, 8, 12, 16]},
                   "ffd_hidden": {"choices": [16, 32]}, "n_att_experts": {"choices": [1, 2, 4]},
                   "k_att": {"choices": [1, 2, 4]}, "n_mlp_experts": [2, 4], "k_mlp": [1, 2, 4]},
}


def _with(path, value):
    raw = copy.deepcopy(SPACE)
    raw["dimensions"][path] = value
    if path == "att_hidden":  # n_head 1 divides everything
        raw["dimensions"]["n_head"] = [2, 4]
    return raw


@pytest.mark.parametrize("dimension,value,message", [
    ("k_att", {"choices": [8]}, r"k_att choice\(s\) \[8\] exceed every n_att_experts choice \(max 4\)"),
    ("k_mlp", [1, 8], r"k_mlp choice\(s\) \[8\] exceed every n_mlp_experts"),
    ("n_head", [1, 5], r"n_head choice 5 divides no att_hidden choice \[6, 8, 12, 16\]"),
    ("att_hidden", [8, 9], r"att_hidden choice 9 is divisible by no n_head choice \[2, 4\]"),
    ("n_layer", {"min": 5, "max": 2}, r"'n_layer' is an empty range \(min 5 > max 2\)"),
    ("ffd_hidden", {"choices": []}, r"'ffd_hidden' has an empty 'choices' list"),
    ("n_embd", {"min": 16, "max": 48, "step": 0}, r"step > 0"),
    ("n_embd", [0, 16], r"not positive integers"),
    ("bogus", [1], r"unknown search dimension"),
])
def test_invalid_spaces_are_rejected(dimension, value, message):
    with pytest.raises(SearchSpaceError, match=message):
        space_from_dict(_with(dimension, value))


def test_missing_dimension_and_bad_fixed_field():
    raw = copy.deepcopy(SPACE)
    del raw["dimensions"]["k_mlp"]
    with pytest.raises(SearchSpaceError, match=r"lacks dimension\(s\) \['k_mlp'\]"):
        space_from_dict(raw)
    raw = copy.deepcopy(SPACE)
    raw["fixed"]["n_layer"] = 3
    with pytest.raises(SearchSpaceError, match="both fixed and searched"):
        space_from_dict(raw)
    raw = copy.deepcopy(SPACE)
    raw["fixed"]["gate_type"] = "nope"
    with pytest.raises(ValueError, match="gate_type"):
        space_from_dict(raw)


def _check_valid(arch, raw, exits=False, pruning=False):
    """Independent validity check written from the constraints, not from SearchSpace.is_valid."""
    dims = space_from_dict(raw).dimensions
    for name in DIMENSIONS:
        assert getattr(arch, name) in dims[name], name
    assert arch.k_att <= arch.n_att_experts and arch.k_mlp <= arch.n_mlp_experts
    assert arch.att_hidden % arch.n_head == 0
    assert (arch.exit_layer is not None) == exits and (arch.keep_fraction is not None) == pruning
    if exits:
        assert 1 <= arch.exit_layer < arch.n_layer
    ModuleFormerConfig(**raw["fixed"], **{name: getattr(arch, name) for name in DIMENSIONS})


@pytest.mark.parametrize("exits,pruning", [(False, False), (True, True)])
def test_sample_mutate_crossover_stay_valid(exits, pruning):
    space = space_from_dict(SPACE, include_exits=exits, include_pruning=pruning)
    rng = random.Random(0)
    archs = [space.sample(rng) for _ in range(100)]
    for arch in archs:
        _check_valid(arch, SPACE, exits, pruning)
        _check_valid(space.mutate(arch, rng, prob=0.9), SPACE, exits, pruning)
        _check_valid(space.crossover(arch, rng.choice(archs), rng), SPACE, exits, pruning)
    assert len({a.arch_id for a in archs}) > 40  # the sampler explores
    assert all(space.is_valid(a) for a in archs)
    for name in DIMENSIONS:  # every choice is reachable
        assert {getattr(a, name) for a in archs} == set(space.dimensions[name]), name


def test_mutation_probability_zero_is_identity_and_prob_one_moves():
    space = space_from_dict(SPACE)
    rng = random.Random(1)
    arch = space.sample(rng)
    assert space.mutate(arch, rng, prob=0.0) == arch
    assert any(space.mutate(arch, rng, prob=1.0) != arch for _ in range(5))


def test_arch_id_is_sha1_of_sorted_config():
    arch = Architecture(n_layer=2, n_embd=16, n_head=2, att_hidden=8, ffd_hidden=16, n_att_experts=2, k_att=1,
                        n_mlp_experts=4, k_mlp=2)
    text = ('{"att_hidden":8,"ffd_hidden":16,"k_att":1,"k_mlp":2,"n_att_experts":2,"n_embd":16,"n_head":2,'
            '"n_layer":2,"n_mlp_experts":4}')
    assert arch.arch_id == hashlib.sha1(text.encode()).hexdigest()[:16]
    other = Architecture(**{**arch.to_dict(), "k_mlp": 1})
    assert other.arch_id != arch.arch_id
    assert Architecture(**json.loads(text)).arch_id == arch.arch_id
    assert Architecture(**{**arch.to_dict(), "exit_layer": 1}).arch_id != arch.arch_id


def test_pruned_config_keeps_at_least_k_experts():
    space = space_from_dict(SPACE, include_pruning=True)
    arch = Architecture(n_layer=2, n_embd=16, n_head=2, att_hidden=8, ffd_hidden=16, n_att_experts=4, k_att=2,
                        n_mlp_experts=4, k_mlp=1, keep_fraction=0.25)
    pruned = space.to_config(arch, pruned=True)
    assert (pruned.n_att_experts, pruned.n_mlp_experts) == (2, 1)  # max(k, ceil(0.25 * 4))
    assert space.to_config(arch).n_att_experts == 4


def test_bundled_default_space_loads():
    space = load_space()
    assert set(space.dimensions) == set(DIMENSIONS)
    assert space.fixed["vocab_size"] == 2048
