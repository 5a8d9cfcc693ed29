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


# ------------------------------------------------------------------------------ the model's own loss, per option
def _model(exit_loss="ce", backbone="moduleformer", **settings):
    torch.manual_seed(0)
    if backbone == "moduleformer":
        config = ModuleFormerConfig(**tiny_config_kwargs(n_layer=4, aux_loss_weight=0.5))
    else:
        from transformers import GPT2Config

        config = GPT2Config(vocab_size=97, n_embd=32, n_layer=4, n_head=2, n_positions=32, bos_token_id=1,
                            eos_token_id=2, pad_token_id=0)
    config.lm_loss_weight, config.exit_loss = 1.0, exit_loss
    for key, value in settings.items():
        setattr(config, key, value)
    return AutoMultiExitModel.from_config(config, MEC(lm_head_layer_indices=(1, 2, 3)))


def _ce(logits, x):
    """Shifted token CE in float64, by hand (log-softmax and gather)."""
    logp = torch.log_softmax(logits[:, :-1].double(), -1)
    return -logp.gather(-1, x[:, 1:, None])[..., 0].mean()


def _hand_parts(model, x):
    """Per-layer CEs {k: CE}, L -> the original head, from the backbone's hidden states and the heads' weights."""
    with torch.no_grad():
        hs = model.transformer(x, output_hidden_states=True).hidden_states
    ln_f = model.transformer.ln_f
    ces = {k: _ce(ln_f(hs[k]) @ model.name_to_lm_exit_head[f"lm_head_{k}"].weight.T, x) for k in (1, 2, 3)}
    ces[4] = _ce(hs[4] @ model.lm_head.weight.T, x)
    return hs, ces


X = torch.randint(3, 97, (2, 10), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("weighting", ["sum", "calm"])
def test_model_loss_ce_option(weighting):
    model = _model("ce", exit_loss_weighting=weighting, exit_loss_weight=0.7).eval()
    with torch.no_grad():
        out = model(X, labels=X)
    _, ces = _hand_parts(model, X)
    c = {k: (k / 6.0 if weighting == "calm" else 1.0) for k in (1, 2, 3)}
    expected = ces[4] + 0.7 * sum(c[k] * ces[k] for k in (1, 2, 3)) + 0.5 * out.aux_loss.double()
    assert float(out.loss) == pytest.approx(float(expected), rel=1e-5)


def test_model_loss_shallow_deep_option():
    model = _model("shallow_deep", shallow_exit=2, kd_alpha=0.3).eval()
    with torch.no_grad():
        out = model(X, labels=X)
    hs, ces = _hand_parts(model, X)
    ln_f = model.transformer.ln_f
    state = {1: ln_f(hs[1]), 2: ln_f(hs[2]), 3: ln_f(hs[3]), 4: hs[4]}  # after i blocks, final-normed
    # L = 4, S = 2: teachers after blocks 2 and 4 (FREE's table ceil((k+1) L / S)); students after blocks 1, 2;
    # kd_dyna by enumeration: the last teacher takes its best student, the first the best one strictly below
    mse = lambda a, b: float(((a.double() - b.double()) ** 2).mean())  # noqa: E731
    top = min((1, 2), key=lambda s: mse(state[4], state[s]))
    first = 1 if top == 2 else top
    kd = (mse(state[2], state[first]) + mse(state[4], state[top])) / 2
    expected = (2 * ces[2] + 4 * ces[4]) / 6 + 0.3 * kd + 0.5 * float(out.aux_loss)
    assert float(out.loss) == pytest.approx(float(expected), rel=1e-5)


@pytest.mark.parametrize("backbone", ["moduleformer", "gpt2"])
def test_model_loss_layerskip_option_and_layer_dropout(backbone):
    model = _model("layerskip", backbone, exit_loss_scale="sum_l", exit_loss_e_scale=0.5).eval()
    with torch.no_grad():
        out = model(X, labels=X)
    _, ces = _hand_parts(model, X)
    raw = {1: 0.5 * 1, 2: 0.5 * 3, 3: 0.5 * 6, 4: 10.0}  # sum_l = l(l+1)/2, e_scale on the non-final exits
    expected = sum(raw[k] * ces[k] for k in raw) / sum(raw.values())
    if out.aux_loss is not None:
        expected = expected + 0.5 * float(out.aux_loss)
    assert float(out.loss) == pytest.approx(float(expected), rel=1e-5)
    # layer dropout p_max = 1 with a uniform shape: in training every block is skipped, every exit reads the embedding
    dropped = _model("layerskip", backbone, layer_dropout=1.0, layer_dropout_scale="uniform")
    dropped.config.moe_pdrop = 0.0
    for name, module in dropped.named_modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    dropped.train()
    hs = dropped.transformer(X, output_hidden_states=True).hidden_states
    for k in (1, 2, 3):
        torch.testing.assert_close(hs[k], hs[0])
    dropped.eval()
    assert not torch.equal(dropped.transformer(X, output_hidden_states=True).hidden_states[1], hs[0])


def test_loss_options_are_validated():
    with pytest.raises(ValueError, match="exit_loss must be one of"):
        _model("kl")
    with pytest.raises(ValueError, match="needs shallow_exit"):
        _model("shallow_deep", shallow_exit=4)
    with pytest.raises(ValueError, match=r"layer_dropout \(LayerSkip's p_max\)"):
        _model("layerskip", layer_dropout=1.5)


def test_recipe_exit_loss_reaches_the_model(tmp_path):
    from moduleformer_exit.training.pretrain import build_model
    from moduleformer_exit.training.recipe import RecipeError, load_recipe

    recipe = load_recipe("tiny", overrides=["exits.layers=[1]", "exits.loss=shallow_deep", "exits.shallow_exit=1",
                                            "exits.kd_alpha=0.2", "exits.layer_dropout=0.1"])
    model = build_model(recipe, 97, 0)
    assert (model.config.exit_loss, model.config.shallow_exit, model.config.kd_alpha) == ("shallow_deep", 1, 0.2)
    assert len(model._layer_dropout_hooks) == model.config.num_hidden_layers
    with pytest.raises(RecipeError, match="needs shallow_exit"):
        load_recipe("tiny", overrides=["exits.layers=[1]", "exits.loss=shallow_deep"])
    neo = load_recipe("early-exit-neo-8l")
    model = build_model(neo, 97, 0)
    assert type(model).__name__ == "MultiExitGPTNeo" and model.exit_layers == list(range(1, 8))
    with pytest.raises(RecipeError, match="model.model_type must be one of"):
        load_recipe("tiny", overrides=["model.model_type=llama"])
