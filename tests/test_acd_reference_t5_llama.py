"""T5 and Llama checkpoints written by IBM's autocontrastive-gen load unchanged and reproduce the library's outputs.

tests/data/acd/t5 (library 0.2.0, ``MultiHeadT5``, decoder exits 1, 2, 4; the decoder is deeper than the encoder) and
tests/data/acd/llama (GitHub HEAD, ``MultiExitLlama``, exits 1, 2, 4) hold tiny checkpoints saved by the library and
the numbers it computed (see tests/data/acd/README.md); no library code is in this repository.
"""
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import T5Config, T5ForConditionalGeneration

from moduleformer_exit import AutoMultiExitModel
from moduleformer_exit import MultiExitConfiguration as MEC
from moduleformer_exit.multi_exit_models import MultiExitLlama, MultiExitT5

DATA = Path(__file__).parent / "data" / "acd"
MODES = ["original", "exit_1", "exit_2", "exit_4", "acd_original_2", "acd_4_1"]
GREEDY = ["original", "exit_2", "acd_original_2", "acd_4_1"]
# The library ran T5 on transformers 4.33 (eager attention): eager reproduces it bit for bit; sdpa differs by float32
# rounding (1.5e-5 on these logits, while float64 differs from both by 1.1e-5).
LOAD = {"t5": {"attn_implementation": "eager"}, "llama": {}}


def runtime(mode, **extra):
    """The MultiExitConfiguration of a reference tensor name (original / exit_<k> / acd_<u>_<l>)."""
    if mode == "original":
        return MEC(**extra)
    if mode.startswith("exit_"):
        return MEC(use_original_head=False, output_layer_index=int(mode.split("_")[1]), **extra)
    _, upper, lower = mode.split("_")
    return MEC(use_original_head=False, contrast_layer_indices=f"{upper};{lower}", **extra)


@pytest.fixture(scope="module", params=["t5", "llama"])
def reference(request):
    directory = DATA / request.param
    model = AutoMultiExitModel.from_pretrained(directory, MEC(freeze_parameters=True), **LOAD[request.param]).eval()
    return request.param, model, load_file(directory / "reference.safetensors")


def forward_logits(kind, model, ref):
    with torch.no_grad():
        if kind == "t5":
            return model(input_ids=ref["input_ids"], attention_mask=ref["attention_mask"],
                         decoder_input_ids=ref["decoder_input_ids"]).logits
        return model(ref["input_ids"]).logits


def test_checkpoint_loads_as_its_class_with_frozen_base(reference):
    kind, model, _ = reference
    assert type(model) is {"t5": MultiExitT5, "llama": MultiExitLlama}[kind]
    assert model.exit_layers == [1, 2, 4] and model.num_exit_layers == 4
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"name_to_lm_exit_head.lm_head_{k}.weight" for k in (1, 2, 4)}


@pytest.mark.parametrize("mode", MODES)
def test_logits_match_the_library(reference, mode):
    """Every position (T5: every decoder position) of the original head, each exit and both contrasts."""
    kind, model, ref = reference
    model.set_multi_exit_config(runtime(mode))
    torch.testing.assert_close(forward_logits(kind, model, ref), ref[mode], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mode", GREEDY)
def test_greedy_generation_matches_the_library(reference, mode):
    kind, model, ref = reference
    model.set_multi_exit_config(runtime(mode))
    if kind == "t5":  # the encoder runs once inside generate(); the decoder (4 blocks) is deeper than it (3)
        tokens = model.generate(ref["input_ids"], attention_mask=ref["attention_mask"], max_new_tokens=6,
                                do_sample=False)
    else:
        prompt = ref["prompt_ids"]
        tokens = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=6, do_sample=False,
                                pad_token_id=0)
    assert tokens.tolist() == ref[f"greedy_{mode}"].tolist()


def test_t5_beam_search_and_exit_loss_match_the_library():
    ref = load_file(DATA / "t5" / "reference.safetensors")
    model = AutoMultiExitModel.from_pretrained(DATA / "t5", runtime("acd_original_2"), **LOAD["t5"]).eval()
    beams = model.generate(ref["input_ids"], attention_mask=ref["attention_mask"], max_new_tokens=5, num_beams=3,
                           do_sample=False)
    assert beams.tolist() == ref["beam3_acd_original_2"].tolist()
    model.set_multi_exit_config(MEC())
    with torch.no_grad():  # 0.2.0's T5 loss: the sum of the exits' unshifted CEs, the original head excluded
        out = model(input_ids=ref["input_ids"], attention_mask=ref["attention_mask"], labels=ref["labels"])
    assert out.loss.item() == pytest.approx(ref["loss_exits"].item(), rel=1e-5)


def test_t5_shared_projection_matches_library_head():
    """HEAD's SHARED_PROJECTION_DIRECT on T5: lm_head(final_layer_norm(h_k) * d_model**-0.5), every decoder position."""
    ref, head = (load_file(DATA / "t5" / name) for name in ("reference.safetensors", "reference_head.safetensors"))
    model = AutoMultiExitModel.from_pretrained(
        DATA / "t5", runtime("exit_2", vocab_projection_mode="SHARED_PROJECTION_DIRECT"), **LOAD["t5"]).eval()
    for layer in (2, 4):
        model.set_multi_exit_config(runtime(f"exit_{layer}", vocab_projection_mode="SHARED_PROJECTION_DIRECT"))
        torch.testing.assert_close(forward_logits("t5", model, ref), head[f"head_direct_exit_{layer}"],
                                   atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mode", ["direct_exit_1", "direct_exit_2", "direct_acd_4_1"])
def test_llama_shared_projection_matches_library_head(mode):
    ref = load_file(DATA / "llama" / "reference.safetensors")
    model = AutoMultiExitModel.from_pretrained(
        DATA / "llama", runtime(mode.replace("direct_", ""), vocab_projection_mode="SHARED_PROJECTION_DIRECT")).eval()
    torch.testing.assert_close(forward_logits("llama", model, ref), ref[mode], atol=1e-5, rtol=1e-5)
    if mode == "direct_exit_2":
        prompt = ref["prompt_ids"]
        tokens = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=6, do_sample=False,
                                pad_token_id=0)
        assert tokens.tolist() == ref["greedy_direct_exit_2"].tolist()


@pytest.mark.parametrize("decoder_layers", [3, 1])
def test_t5_generates_when_decoder_and_encoder_depths_differ(decoder_layers):
    """transformers 5.23 / 5.24 size generate()'s cache by the encoder depth (IndexError when the decoder is deeper).
    Reference: greedy decoding by hand, re-running the full decoder without a cache at every step."""
    config = T5Config(vocab_size=40, d_model=16, d_kv=8, d_ff=32, num_layers=2, num_decoder_layers=decoder_layers,
                      num_heads=2, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1, initializer_factor=2.0)
    torch.manual_seed(0)
    model = MultiExitT5(config, multi_exit_config=MEC(lm_head_layer_indices=(1,))).eval()
    plain = T5ForConditionalGeneration(config).eval()
    plain.load_state_dict(model.state_dict(), strict=False)
    input_ids = torch.randint(2, 40, (2, 5))
    model.set_multi_exit_config(MEC(use_original_head=False, output_layer_index=1))
    tokens = model.generate(input_ids, max_new_tokens=5, do_sample=False, eos_token_id=None)
    decoded = torch.zeros(2, 1, dtype=torch.long)
    with torch.no_grad():
        for _ in range(5):
            hidden = plain(input_ids, decoder_input_ids=decoded, output_hidden_states=True,
                           use_cache=False).decoder_hidden_states[1]
            h = plain.decoder.final_layer_norm(hidden[:, -1]) * 16 ** -0.5 if decoder_layers > 1 else \
                hidden[:, -1] * 16 ** -0.5
            decoded = torch.cat([decoded, model.name_to_lm_exit_head["lm_head_1"](h).argmax(-1, keepdim=True)], 1)
    assert tokens.tolist() == decoded.tolist()
