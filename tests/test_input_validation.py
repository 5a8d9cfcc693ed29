"""Bad inputs get an error naming the field and the fix (issue #10 item 12): config floats as strings or NaN,
booleans and whole numbers in MultiExitConfiguration, an attention mask of the wrong length (all ones included),
a zero-byte weights file."""
import math

import pytest
import torch

from moduleformer_exit import ModuleFormerConfig, ModuleFormerForCausalLM, MultiExitConfiguration

TINY = dict(vocab_size=64, n_embd=16, n_layer=2, n_head=2, att_hidden=8, ffd_hidden=16, n_att_experts=2, k_att=1,
            n_mlp_experts=2, k_mlp=1, gating_size=4)


@pytest.mark.parametrize("field,value", [("resid_pdrop", "0.1"), ("attn_pdrop", math.nan), ("moe_pdrop", True),
                                         ("aux_loss_weight", math.nan), ("aux_loss_weight", "0.01"),
                                         ("aux_loss_weight", math.inf)])
def test_config_numbers_must_be_real_finite_numbers(field, value):
    with pytest.raises(ValueError, match=f"ModuleFormerConfig.{field} must be a"):
        ModuleFormerConfig(**TINY, **{field: value})


@pytest.mark.parametrize("text,expected", [("false", False), ("False", False), ("true", True), ("1", True),
                                           ("0", False)])
def test_boolean_strings(text, expected):
    kwargs = {"use_original_head": text}
    if not expected:
        kwargs["output_layer_index"] = 1
    assert MultiExitConfiguration(**kwargs).use_original_head is expected
    assert MultiExitConfiguration(freeze_parameters=text).freeze_parameters is expected


def test_bad_boolean_and_fractional_candidates_name_the_field():
    with pytest.raises(ValueError, match="use_original_head must be true or false, got 'maybe'"):
        MultiExitConfiguration(use_original_head="maybe")
    with pytest.raises(ValueError, match="minimum_candidates must be a whole number, got 2.7"):
        MultiExitConfiguration(minimum_candidates=2.7)
    assert MultiExitConfiguration(minimum_candidates="3").minimum_candidates == 3
    with pytest.raises(ValueError, match="alpha must be a number"):
        MultiExitConfiguration(alpha="high")


@pytest.mark.parametrize("mask_len", [5, 9])
def test_attention_mask_of_the_wrong_length_is_refused_even_all_ones(mask_len):
    model = ModuleFormerForCausalLM(ModuleFormerConfig(**TINY)).eval()
    x = torch.randint(0, 64, (2, 7))
    with pytest.raises(ValueError, match=r"attention_mask must be 2-D \[batch, past \+ new\] = \[2, 7\]"):
        model(x, attention_mask=torch.ones(2, mask_len, dtype=torch.long))
    model(x, attention_mask=torch.ones(2, 7, dtype=torch.long))  # the right length passes


def test_zero_byte_bin_names_the_checkpoint(tmp_path):
    ModuleFormerConfig(**TINY).save_pretrained(tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(ValueError, match=rf"{tmp_path}.*empty or truncated"):
        ModuleFormerForCausalLM.from_pretrained(str(tmp_path))
