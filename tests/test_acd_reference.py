"""Checkpoints written by IBM's autocontrastive-gen load unchanged and reproduce the library's outputs.

tests/data/acd/ holds tiny GPT-2 / GPT-Neo multi-exit checkpoints saved by the library (0.2.0 and GitHub HEAD) and
the numbers it computed (see its README); no library code is in this repository.
"""
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from moduleformer_exit import MultiExitConfiguration as MEC
from moduleformer_exit import AutoMultiExitModel, calculate_contrasted_logits

DATA = Path(__file__).parent / "data" / "acd"
CONTRASTS = {"gpt2": [("original", 2), (4, 2)], "gpt_neo": [("original", 3), (4, 2)]}
EXITS = {"gpt2": (1, 2, 4), "gpt_neo": (2, 3, 4)}


def mode_name(pair):
    return f"acd_{pair[0]}_{pair[1]}"


def runtime(mode):
    """The MultiExitConfiguration of a reference tensor name (original / exit_<k> / acd_<u>_<l>)."""
    if mode == "original":
        return MEC()
    if mode.startswith("exit_"):
        return MEC(use_original_head=False, output_layer_index=int(mode.split("_")[1]))
    _, upper, lower = mode.split("_")
    return MEC(use_original_head=False, contrast_layer_indices=f"{upper};{lower}")


@pytest.fixture(scope="module", params=["gpt2", "gpt_neo"])
def reference(request):
    directory = DATA / request.param
    model = AutoMultiExitModel.from_pretrained(directory, MEC(freeze_parameters=True)).eval()
    return request.param, model, load_file(directory / "reference.safetensors")


def all_modes(kind):
    return ["original"] + [f"exit_{k}" for k in EXITS[kind]] + [mode_name(p) for p in CONTRASTS[kind]]


def test_checkpoint_loads_with_its_heads(reference):
    kind, model, _ = reference
    assert model.exit_layers == list(EXITS[kind])
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"name_to_lm_exit_head.lm_head_{k}.weight" for k in EXITS[kind]}


def test_logits_of_every_mode_match_the_library(reference):
    kind, model, ref = reference
    with torch.no_grad():
        for mode in all_modes(kind):
            model.set_multi_exit_config(runtime(mode))
            torch.testing.assert_close(model(ref["input_ids"]).logits, ref[mode], atol=2e-5, rtol=1e-5, msg=mode)


def test_exit_loss_matches_the_library(reference):
    _, model, ref = reference
    model.set_multi_exit_config(MEC())
    with torch.no_grad():
        loss = model(ref["input_ids"], labels=ref["labels"]).loss
    assert loss.item() == pytest.approx(ref["loss_exits"].item(), rel=1e-5)


def test_greedy_and_beam_generation_match_the_library(reference):
    kind, model, ref = reference
    for mode in ["original", "exit_2"] + [mode_name(p) for p in CONTRASTS[kind]]:
        model.set_multi_exit_config(runtime(mode))
        tokens = model.generate(ref["prompt_ids"], max_new_tokens=6, do_sample=False, pad_token_id=0)
        assert tokens.tolist() == ref[f"greedy_{mode}"].tolist(), mode
    if "beam3_acd_original_2" in ref:
        model.set_multi_exit_config(runtime("acd_original_2"))
        beams = model.generate(ref["prompt_ids"], max_new_tokens=5, num_beams=3, do_sample=False, pad_token_id=0)
        assert beams.tolist() == ref["beam3_acd_original_2"].tolist()


@pytest.mark.parametrize("kind", ["gpt2", "gpt_neo"])
def test_projection_modes_match_library_head(kind):
    """GitHub HEAD's projection modes (it computes only the last position)."""
    head = load_file(DATA / kind / "reference_head.safetensors")
    input_ids = load_file(DATA / kind / "reference.safetensors")["input_ids"]
    direct = AutoMultiExitModel.from_pretrained(
        DATA / kind, MEC(vocab_projection_mode="SHARED_PROJECTION_DIRECT", use_original_head=False,
                         output_layer_index=2)).eval()
    with torch.no_grad():
        torch.testing.assert_close(direct(input_ids).logits[:, -1:], head["head_direct_exit_2"], atol=2e-5, rtol=1e-5)


def test_cast_projection_checkpoint_matches_library_head():
    ref = load_file(DATA / "gpt2_cast" / "reference.safetensors")
    input_ids = load_file(DATA / "gpt2" / "reference.safetensors")["input_ids"]
    model = AutoMultiExitModel.from_pretrained(
        DATA / "gpt2_cast", MEC(vocab_projection_mode="SHARED_PROJECTION_CAST_OUTPUTS", use_original_head=False,
                                output_layer_index=2)).eval()
    assert sorted(model.name_to_conv_matrix) == ["1_to_4", "2_to_4"]
    with torch.no_grad():
        for mode, cfg in [("head_cast_exit_2", dict(output_layer_index=2)),
                          ("head_cast_exit_1", dict(output_layer_index=1)),
                          ("head_cast_acd_original_2", dict(contrast_layer_indices=("original", 2)))]:
            model.set_multi_exit_config(MEC(vocab_projection_mode="SHARED_PROJECTION_CAST_OUTPUTS",
                                            use_original_head=False, **cfg))
            torch.testing.assert_close(model(input_ids).logits[:, -1:], ref[mode], atol=2e-5, rtol=1e-5, msg=mode)


@pytest.mark.parametrize("shape", ["1x1x20", "2x3x20", "1x1x50"])
@pytest.mark.parametrize("alpha, mc", [(0.1, 1), (0.5, 1), (0.1, 3), (0.9, 2)])
def test_contrast_function_matches_library_vectors(shape, alpha, mc):
    vectors = load_file(DATA / "acd_vectors.safetensors")
    got = calculate_contrasted_logits(vectors[f"upper_{shape}"], vectors[f"lower_{shape}"],
                                      minimum_candidates=mc, alpha=alpha)
    torch.testing.assert_close(got, vectors[f"out_{shape}_a{alpha}_mc{mc}"], atol=2e-6, rtol=1e-5)
