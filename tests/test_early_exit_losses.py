"""Early-exit training losses: FREE shallow-deep (weights, teacher table, kd_dyna vs brute force, no teacher
gradient) and LayerSkip (exit scales, layer dropout), against hand-computed values."""
import itertools
import math

import pytest
import torch

from conftest import tiny_config_kwargs
from moduleformer_exit import ModuleFormerConfig
from moduleformer_exit.early_exit.losses import (early_exit_loss_weights, enable_layer_dropout, kd_dyna_assignment,
                                                 layer_dropout_rates, layerskip_loss, shallow_deep_loss,
                                                 teacher_layers)
from moduleformer_exit.multi_exit_config import MultiExitConfiguration as MEC
from moduleformer_exit.multi_exit_models import AutoMultiExitModel


def test_teacher_table_matches_free():
    assert teacher_layers(24, 6) == [3, 7, 11, 15, 19, 23]
    assert teacher_layers(24, 8) == [2, 5, 8, 11, 14, 17, 20, 23]
    assert teacher_layers(24, 10) == [2, 5, 7, 10, 12, 15, 17, 19, 21, 23]
    assert teacher_layers(12, 3) == [3, 7, 11]
    with pytest.raises(ValueError, match="shallow exit"):
        teacher_layers(8, 8)


def _brute_force_greedy(costs):
    """The rule spelled out: walk teachers from last to first, candidates = all students below the previous pick."""
    teachers, students = costs.shape
    allowed = list(range(students))
    out = {}
    for t in reversed(range(teachers)):
        if allowed:
            best = min(allowed, key=lambda s: (float(costs[t, s]), s))
            out[t] = best
            allowed = [s for s in allowed if s < best]
        else:
            out[t] = out[t + 1] if t + 1 in out else 0
    return [out[t] for t in range(teachers)]


def test_kd_dyna_equals_brute_force_and_is_monotone():
    gen = torch.Generator().manual_seed(0)
    for _ in range(50):
        costs = torch.rand(6, 4, generator=gen)
        picked = kd_dyna_assignment(costs)
        assert picked == _brute_force_greedy(costs)
        assert all(a <= b for a, b in zip(picked, picked[1:]))


def test_shallow_deep_loss_weights_and_teacher_gradient():
    torch.manual_seed(0)
    model = AutoMultiExitModel.from_config(ModuleFormerConfig(**tiny_config_kwargs(n_layer=4)),
                                           MEC(lm_head_layer_indices=(1, 2, 3)))
    x = torch.randint(3, 97, (2, 8))
    hs = model(x, output_hidden_states=True).hidden_states
    parts = shallow_deep_loss(model, hs, x, shallow=2, alpha=0.5)
    ce_s = torch.nn.functional.cross_entropy(model.exit_logits(hs, 2)[:, :-1].reshape(-1, 97), x[:, 1:].reshape(-1))
    ce_d = torch.nn.functional.cross_entropy(model.lm_head(hs[4])[:, :-1].reshape(-1, 97), x[:, 1:].reshape(-1))
    torch.testing.assert_close(parts["ce_shallow"], ce_s)
    torch.testing.assert_close(parts["loss"], (2 * ce_s + 4 * ce_d) / 6 + 0.5 * parts["kd"])
    # the KD term pulls students only: the top layer (teacher only) gets no gradient from it
    top = model.transformer.h[3].mlpf.output_experts.weight
    grad = torch.autograd.grad(parts["kd"], [top], allow_unused=True)[0]
    assert grad is None or float(grad.abs().max()) == 0.0


def test_layerskip_weights_and_loss():
    w = early_exit_loss_weights([1, 2, 4], 4, "sum_l")
    assert w == pytest.approx({1: 1 / 14, 2: 3 / 14, 4: 10 / 14})
    w = early_exit_loss_weights([1, 4], 4, "l", e_scale=0.5)
    assert w == pytest.approx({1: 0.5 / 4.5, 4: 4 / 4.5})
    assert sum(early_exit_loss_weights([1, 2, 3], 3, "inv_sqrt_l").values()) == pytest.approx(1.0)
    loss = layerskip_loss({1: torch.tensor(2.0)}, torch.tensor(1.0), 2, "one")
    assert float(loss) == pytest.approx(1.5)
    with pytest.raises(ValueError, match="scale must be one of"):
        early_exit_loss_weights([1], 2, "cubic")


def test_layer_dropout_rates_and_hooks():
    rates = layer_dropout_rates(5, 0.2, "exp")
    assert rates[0] == 0.0 and rates[-1] == pytest.approx(0.2)
    assert rates[2] == pytest.approx(0.2 * (math.exp(2 * math.log(2) / 4) - 1))
    torch.manual_seed(0)
    model = AutoMultiExitModel.from_config(ModuleFormerConfig(**tiny_config_kwargs(n_layer=2)),
                                           MEC(lm_head_layer_indices=(1,)))
    x = torch.randint(3, 97, (3, 6))
    model.eval()
    reference = model(x, output_hidden_states=True).hidden_states
    handles = enable_layer_dropout(model.transformer.h, [0.0, 1.0])
    assert torch.equal(model(x, output_hidden_states=True).hidden_states[2], reference[2])  # eval: no effect
    model.train()
    model.config.moe_pdrop = 0.0
    hs = model(x, output_hidden_states=True).hidden_states
    torch.testing.assert_close(hs[2], model.transformer.ln_f(hs[1]))  # block 2 always dropped: output = input
    for handle in handles:
        handle.remove()
