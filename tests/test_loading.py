"""Strict loading (issue #10 item 7): a checkpoint missing an exit head, a layer weight or an expert is an error
naming the keys; heads the caller declares new (train-exits) load initialised."""
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from moduleformer_exit import (AutoMultiExitModel, ModuleFormerConfig, ModuleFormerForCausalLM,
                               MultiExitConfiguration, MultiExitModuleFormer)
from moduleformer_exit.loading import MissingWeightsError


def _config():
    return ModuleFormerConfig(vocab_size=64, n_embd=16, n_layer=3, n_head=2, att_hidden=8, ffd_hidden=16,
                              n_att_experts=2, k_att=1, n_mlp_experts=2, k_mlp=1, gating_size=4)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    d = tmp_path_factory.mktemp("mx")
    torch.manual_seed(0)
    MultiExitModuleFormer(_config(), multi_exit_config=MultiExitConfiguration(lm_head_layer_indices=(1, 2))
                          ).save_pretrained(d)
    return d


def _without(src, dst, predicate):
    """Copy the checkpoint ``src`` to ``dst`` without the tensors whose key satisfies ``predicate``."""
    os.makedirs(dst, exist_ok=True)
    for name in os.listdir(src):
        if name != "model.safetensors":
            with open(os.path.join(src, name), "rb") as f, open(os.path.join(dst, name), "wb") as g:
                g.write(f.read())
    state = load_file(os.path.join(src, "model.safetensors"))
    dropped = [k for k in state if predicate(k)]
    assert dropped
    save_file({k: v for k, v in state.items() if k not in dropped}, os.path.join(dst, "model.safetensors"),
              metadata={"format": "pt"})
    return dst


def test_complete_checkpoint_loads(saved):
    model = AutoMultiExitModel.from_pretrained(str(saved))
    assert model.exit_layers == [1, 2]
    model, info = MultiExitModuleFormer.from_pretrained(str(saved), output_loading_info=True)
    assert info["missing_keys"] == set() or not info["missing_keys"]


def test_missing_exit_head_is_an_error(saved, tmp_path):
    bad = _without(saved, tmp_path / "bad", lambda k: k.startswith("name_to_lm_exit_head.lm_head_2"))
    with pytest.raises(MissingWeightsError, match=r"lacks weights .*name_to_lm_exit_head\.lm_head_2\.weight"):
        AutoMultiExitModel.from_pretrained(str(bad))


@pytest.mark.parametrize("part", ["transformer.h.1.", "experts"])
def test_missing_layer_or_expert_is_an_error_for_both_model_classes(saved, tmp_path, part):
    bad = _without(saved, tmp_path / "bad", lambda k: part in k and k.startswith("transformer."))
    with pytest.raises(MissingWeightsError, match=part.replace(".", r"\.")):
        AutoMultiExitModel.from_pretrained(str(bad))
    with pytest.raises(MissingWeightsError, match=part.replace(".", r"\.")):
        ModuleFormerForCausalLM.from_pretrained(str(bad))


def test_declared_new_heads_load_initialised(saved):
    runtime = MultiExitConfiguration(lm_head_layer_indices=(1, 2, 3))
    model = AutoMultiExitModel.from_pretrained(str(saved), runtime)
    assert model.exit_layers == [1, 2, 3]
    reference = load_file(os.path.join(saved, "model.safetensors"))
    assert torch.equal(model.name_to_lm_exit_head["lm_head_1"].weight, reference["name_to_lm_exit_head.lm_head_1.weight"])
