"""Checkpoints written by IBM's original ModuleFormer code load unchanged and reproduce its outputs.

The data in tests/data/ibm/ was produced by running the original implementation (see its README); these tests load
each checkpoint with ``AutoModelForCausalLM`` and compare logits, hidden states, losses, gradients, incremental
decoding and greedy generation with the numbers the original code computed.
"""
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import moduleformer_exit  # noqa: F401  (registers the Auto classes)

DATA = Path(__file__).parent / "data" / "ibm"
CASES = sorted(p.name for p in DATA.iterdir() if (p / "reference.json").exists())


def max_rel_err(got, want):
    return ((got.double() - want.double()).abs().max() / want.double().abs().max().clamp_min(1e-30)).item()


@pytest.fixture(scope="module", params=CASES)
def case(request):
    directory = DATA / request.param
    model, info = AutoModelForCausalLM.from_pretrained(directory, output_loading_info=True)
    return {
        "name": request.param,
        "model": model,
        "info": info,
        "ref": load_file(directory / "reference.safetensors"),
        "meta": json.loads((directory / "reference.json").read_text()),
    }


def test_cases_present():
    assert {"mlp_mi", "linear_switch", "gmm_mi", "mlp_switch_sample", "mlp_mi_k1"} <= set(CASES)


def test_loads_without_missing_or_unexpected_keys(case):
    info = case["info"]
    assert not info["missing_keys"]
    assert not info["unexpected_keys"]
    assert not info.get("mismatched_keys")
    assert "attn.mask" in " ".join(case["meta"]["checkpoint_keys"])  # the legacy buffers were in the file


def test_eval_logits_hidden_states_and_loss_match(case):
    model, ref = case["model"].eval(), case["ref"]
    with torch.no_grad():
        out = model(ref["input_ids"], attention_mask=ref["attention_mask"], labels=ref["labels"],
                    output_hidden_states=True)
    assert max_rel_err(out.logits, ref["logits"]) < 1e-5
    assert max_rel_err(torch.stack(out.hidden_states), ref["hidden_states"]) < 1e-5
    assert out.loss.item() == pytest.approx(ref["eval_loss"].item(), rel=1e-5, abs=1e-6)
    assert out.aux_loss.item() == pytest.approx(ref["eval_aux_loss"].item(), rel=1e-5, abs=1e-6)


def test_train_mode_loss_aux_and_gradients_match(case):
    model, ref = case["model"], case["ref"]
    model.train()
    model.zero_grad(set_to_none=True)
    try:
        torch.manual_seed(1234)  # as the reference run: sample_topk draws come from the default generator
        out = model(ref["input_ids"], attention_mask=ref["attention_mask"], labels=ref["labels"])
        out.loss.backward()
    finally:
        model.eval()
    assert out.loss.item() == pytest.approx(ref["train_loss"].item(), rel=1e-5, abs=1e-6)
    assert out.aux_loss.item() == pytest.approx(ref["train_aux_loss"].item(), rel=1e-5, abs=1e-6)
    assert max_rel_err(out.logits, ref["train_logits"]) < 1e-5
    params = dict(model.named_parameters())
    for key in ref:
        if key.startswith("grad."):
            assert max_rel_err(params[key[len("grad."):]].grad, ref[key]) < 1e-4, key


def test_incremental_decoding_matches_original(case):
    model, ref = case["model"].eval(), case["ref"]
    row = ref["input_ids"][:1, :10]
    with torch.no_grad():
        first = model(row[:, :6], use_cache=True)
        second = model(row[:, 6:9], past_key_values=first.past_key_values, use_cache=True)
        third = model(row[:, 9:10], past_key_values=second.past_key_values, use_cache=True)
    logits = torch.cat([first.logits, second.logits, third.logits], 1)
    assert max_rel_err(logits, ref["incremental_logits"]) < 1e-5
    assert max_rel_err(logits, ref["full_logits_row0"]) < 1e-5


def test_greedy_generation_matches_original(case):
    model, ref = case["model"].eval(), case["ref"]
    prompt = ref["input_ids"][:1, :5]
    tokens = model.generate(prompt, max_new_tokens=8, do_sample=False, pad_token_id=1)
    assert tokens.tolist() == ref["greedy_tokens"].tolist()


def test_generation_with_cache_equals_without_for_batches_and_beams(case):
    # IBM's reference greedy tokens (above) pin the single-prompt result; here the cache must not change anything:
    # a left-padded batch equals each prompt alone, and beam search equals its uncached run.
    model, ref = case["model"].eval(), case["ref"]
    prompts = [ref["input_ids"][0, :5].tolist(), ref["input_ids"][0, 2:9].tolist(), ref["input_ids"][0, 1:4].tolist()]
    width = max(len(p) for p in prompts)
    batch = torch.full((3, width), 1, dtype=torch.long)
    mask = torch.zeros_like(batch)
    for row, prompt in enumerate(prompts):
        batch[row, width - len(prompt):] = torch.tensor(prompt)
        mask[row, width - len(prompt):] = 1
    greedy = dict(max_new_tokens=6, do_sample=False, pad_token_id=1)
    cached = model.generate(batch, attention_mask=mask, **greedy)
    assert torch.equal(cached, model.generate(batch, attention_mask=mask, use_cache=False, **greedy))
    for row, prompt in enumerate(prompts):
        new = model.generate(torch.tensor([prompt]), **greedy)[0, len(prompt):].tolist()
        assert cached[row, width:width + len(new)].tolist() == new  # a row that hit EOS alone is padded after it
        assert all(t == 1 for t in cached[row, width + len(new):].tolist())
    beams = dict(max_new_tokens=5, num_beams=3, num_return_sequences=2, do_sample=False, pad_token_id=1)
    prompt = ref["input_ids"][:1, :5]
    assert torch.equal(model.generate(prompt, **beams), model.generate(prompt, use_cache=False, **beams))
