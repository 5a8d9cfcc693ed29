"""Held-out perplexity per head against a float64 computation from the logits of each head."""
import math

import pytest
import torch

from conftest import tiny_config_kwargs
from moduleformer_exit import ModuleFormerConfig, MultiExitConfiguration, MultiExitModuleFormer
from moduleformer_exit.perplexity import heldout_perplexities


def reference_ppl(logits, x, mask):
    """exp of the mean next-token NLL over positions whose label is not masked (float64)."""
    logp = logits[:, :-1].double().log_softmax(-1)
    target = x[:, 1:]
    nll = -logp.gather(-1, target[..., None])[..., 0]
    keep = mask[:, 1:].bool()
    return math.exp(nll[keep].sum().item() / keep.sum().item())


def test_heldout_perplexities_of_every_head():
    torch.manual_seed(0)
    model = MultiExitModuleFormer(ModuleFormerConfig(**tiny_config_kwargs(n_layer=3, aux_loss_weight=0.3)),
                                  multi_exit_config=MultiExitConfiguration(lm_head_layer_indices=(1, 2))).train()
    blocks = torch.randint(3, 97, (5, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(blocks)
    mask[0, :4] = 0  # left padding in one block: its labels are excluded
    ppl = heldout_perplexities(model, blocks, batch_size=2, attention_mask=mask)
    assert model.training  # mode restored
    model.eval()
    with torch.no_grad():
        hidden = model.transformer(blocks, attention_mask=mask, output_hidden_states=True).hidden_states
        expected = {"final": reference_ppl(model.exit_logits(hidden, "original"), blocks, mask)}
        for k in (1, 2):
            expected[f"exit{k}"] = reference_ppl(model.exit_logits(hidden, k), blocks, mask)
    assert set(ppl) == set(expected)
    for name, value in expected.items():
        assert ppl[name] == pytest.approx(value, rel=1e-5), name


def test_bad_blocks_are_rejected():
    model = MultiExitModuleFormer(ModuleFormerConfig(**tiny_config_kwargs()))
    with pytest.raises(ValueError, match="T >= 2"):
        heldout_perplexities(model, torch.ones(3, 1, dtype=torch.long))
