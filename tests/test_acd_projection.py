"""ACD output path: both exits projected (once, fused when they share a head) only at the kept positions.

Reference: logits built by hand in float64 from the backbone's hidden states and the head weights, then
``auto_contrastive_log_probs``; and the full-sequence output sliced (logits_to_keep must not change the values)."""
import pytest
import torch

from conftest import tiny_config_kwargs
from moduleformer_exit import ModuleFormerConfig
from moduleformer_exit.contrast import auto_contrastive_log_probs
from moduleformer_exit.multi_exit_config import MultiExitConfiguration as MEC
from moduleformer_exit.multi_exit_models import AutoMultiExitModel


def _make(mode, pair):
    torch.manual_seed(0)
    cfg = ModuleFormerConfig(**tiny_config_kwargs(n_layer=4))
    return AutoMultiExitModel.from_config(cfg, MEC(lm_head_layer_indices=(1, 2, 4), vocab_projection_mode=mode,
                                                   use_original_head=False, contrast_layer_indices=pair)).eval()


def _ref_logits(model, hs, layer):
    """float64 exit logits from the definition (module docstring of exits.py)."""
    ln = model.backbone.ln_f
    if layer == "original":
        return hs[4].double() @ model.lm_head.weight.double().T
    h = hs[layer].double()
    if layer < 4:
        h = torch.nn.functional.layer_norm(h, h.shape[-1:], ln.weight.double(), ln.bias.double(), ln.eps)
    if hasattr(model, "name_to_lm_exit_head"):
        return h @ model.name_to_lm_exit_head[f"lm_head_{layer}"].weight.double().T
    return h @ model.lm_head.weight.double().T


@pytest.mark.parametrize("mode", ["layer_specific_projection", "shared_projection_direct"])
@pytest.mark.parametrize("pair", [("original", 2), (4, 1)])
def test_acd_logits_match_float64_reference_at_kept_positions(mode, pair):
    model = _make(mode, pair)
    x = torch.randint(3, 97, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = model(x, output_hidden_states=True)
        hs = out.hidden_states
        last = model(x, logits_to_keep=1).logits
    up, low = (_ref_logits(model, hs, layer) for layer in pair)
    expected = auto_contrastive_log_probs(up, low).float()
    torch.testing.assert_close(out.logits, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(last, out.logits[:, -1:], atol=1e-6, rtol=1e-6)
    pair_logits = model.contrast_pair_logits(tuple(h[:, -1:] for h in hs), *pair)
    for got, ref in zip(pair_logits, (up[:, -1:], low[:, -1:])):
        torch.testing.assert_close(got.double(), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mode", ["layer_specific_projection", "shared_projection_direct"])
def test_one_full_vocabulary_projection_per_step(mode, monkeypatch):
    """ACD reads the upper exit's head in full once; the lower exit only at the head set's rows (no module call;
    a flat upper distribution, whose head set is most of the vocabulary, projects the lower exit in full)."""
    model = _make(mode, ("original", 2))
    with torch.no_grad():
        model.lm_head.weight.mul_(200.0)  # a peaked upper exit, as trained ones are: a head set of a few tokens
    calls = []
    heads = {id(model.lm_head)} | ({id(h) for h in model.name_to_lm_exit_head.values()}
                                   if mode == "layer_specific_projection" else set())
    linear_forward = torch.nn.Linear.forward

    def counting_forward(self, x):  # counts vocabulary projections without hooks (a hooked head is not read raw)
        if id(self) in heads:
            calls.append(tuple(x.shape))
        return linear_forward(self, x)

    monkeypatch.setattr(torch.nn.Linear, "forward", counting_forward)
    with torch.no_grad():
        model(torch.randint(3, 97, (1, 5)), logits_to_keep=1)
    assert calls == [(1, 1, 32)]  # lm_head ("original"), last position only


def test_hooked_lower_head_is_called_not_read():
    """A lower head with a forward hook (accelerate offloading, user hooks) goes through its forward: the hook
    fires and the output still equals the float64 reference."""
    model = _make("layer_specific_projection", (4, 1))
    with torch.no_grad():  # a peaked upper exit (a head set of a few tokens), where the lower head is read sparsely
        model.name_to_lm_exit_head["lm_head_4"].weight.mul_(200.0)
    fired = []
    model.name_to_lm_exit_head["lm_head_1"].register_forward_hook(lambda mod, inp, out: fired.append(True))
    x = torch.randint(3, 97, (2, 6), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        out = model(x, output_hidden_states=True)
    assert fired
    up, low = (_ref_logits(model, out.hidden_states, layer) for layer in (4, 1))
    torch.testing.assert_close(out.logits, auto_contrastive_log_probs(up, low).float(), atol=1e-5, rtol=1e-5)
