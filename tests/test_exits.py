"""Exit heads on ModuleFormer / GPT-2 / GPT-Neo: exit definitions, modes, losses, freezing, loading, generation."""
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, GPT2Config, GPTNeoConfig

from conftest import tiny_config_kwargs
from moduleformer_exit import ModuleFormerConfig
from moduleformer_exit.contrast import auto_contrastive_log_probs
from moduleformer_exit.multi_exit_config import MultiExitConfiguration as MEC
from moduleformer_exit.multi_exit_config import VocabularyProjectionMode as Mode
from moduleformer_exit.multi_exit_models import AutoMultiExitModel, fit_cast_matrices

VOCAB = 97


def base_config(kind):
    if kind == "moduleformer":
        return ModuleFormerConfig(**tiny_config_kwargs(n_layer=4))
    if kind == "gpt2":
        return GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=4, n_head=2, n_positions=64, bos_token_id=1,
                          eos_token_id=2, pad_token_id=0)
    return GPTNeoConfig(vocab_size=VOCAB, hidden_size=32, num_layers=4, num_heads=2,
                        attention_types=[[["global", "local"], 2]], window_size=8, max_position_embeddings=64,
                        bos_token_id=1, eos_token_id=2, pad_token_id=0)


def make(kind, seed=0, **mec):
    torch.manual_seed(seed)
    mec.setdefault("lm_head_layer_indices", (1, 2, 4))
    return AutoMultiExitModel.from_config(base_config(kind), MEC(**mec)).eval()


def ids(batch=2, length=7, seed=0):
    return torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


KINDS = ["moduleformer", "gpt2", "gpt_neo"]


@pytest.mark.parametrize("kind", KINDS)
def test_exit_definitions(kind):
    model = make(kind)
    x = ids()
    hs = model(x, output_hidden_states=True).hidden_states
    assert len(hs) == 5
    ln_f, heads = model.backbone.ln_f, model.name_to_lm_exit_head
    torch.testing.assert_close(model.exit_logits(hs, 2), heads["lm_head_2"](ln_f(hs[2])).float())
    torch.testing.assert_close(model.exit_logits(hs, 4), heads["lm_head_4"](hs[4]).float())  # top: no second ln_f
    torch.testing.assert_close(model.exit_logits(hs, "original"), model.lm_head(hs[4]).float())


@pytest.mark.parametrize("kind", KINDS)
def test_output_modes(kind):
    model = make(kind)
    x = ids()
    original = model(x).logits
    hs = model(x, output_hidden_states=True).hidden_states
    plain = AutoModelForCausalLM.from_config(model.config)
    plain.load_state_dict(model.state_dict(), strict=False)
    torch.testing.assert_close(original, plain.eval()(x).logits.float())
    model.set_multi_exit_config(MEC(use_original_head=False, output_layer_index=2))
    torch.testing.assert_close(model(x).logits, model.exit_logits(hs, 2))
    for upper, lower in [("original", 2), (4, 1)]:
        model.set_multi_exit_config(MEC(use_original_head=False, contrast_layer_indices=(upper, lower)))
        expected = auto_contrastive_log_probs(model.exit_logits(hs, upper), model.exit_logits(hs, lower))
        torch.testing.assert_close(model(x).logits, expected)
    model.set_multi_exit_config(MEC(use_original_head=False, contrast_layer_indices="original;1", alpha=0.5,
                                    minimum_candidates=3))
    expected = auto_contrastive_log_probs(model.exit_logits(hs, "original"), model.exit_logits(hs, 1), 0.5, 3)
    torch.testing.assert_close(model(x).logits, expected)
    custom = MEC(use_original_head=False, contrast_layer_indices=(4, 2), contrast_function=lambda u, l: u - l)
    model.set_multi_exit_config(custom)
    torch.testing.assert_close(model(x).logits, model.exit_logits(hs, 4) - model.exit_logits(hs, 2))


@pytest.mark.parametrize("kind", ["moduleformer", "gpt2"])
def test_projection_modes(kind):
    x = ids()
    direct = make(kind, vocab_projection_mode="shared_projection_direct", use_original_head=False,
                  output_layer_index=3)
    hs = direct(x, output_hidden_states=True).hidden_states
    torch.testing.assert_close(direct(x).logits, direct.lm_head(direct.backbone.ln_f(hs[3])).float())
    assert not hasattr(direct, "name_to_lm_exit_head")
    cast = make(kind, vocab_projection_mode=Mode.SHARED_PROJECTION_CAST_OUTPUTS, use_original_head=False,
                output_layer_index=2)
    assert sorted(cast.name_to_conv_matrix) == ["1_to_4", "2_to_4"]
    assert not any(p.requires_grad for p in cast.name_to_conv_matrix.parameters())
    hs = cast(x, output_hidden_states=True).hidden_states
    # Unfitted casts are the identity: CAST == logit lens until fitted.
    torch.testing.assert_close(cast(x).logits, cast.lm_head(cast.backbone.ln_f(hs[2])).float())
    with torch.no_grad():
        cast.name_to_conv_matrix["2_to_4"].weight.normal_()
    w = cast.name_to_conv_matrix["2_to_4"].weight
    torch.testing.assert_close(cast(x).logits, cast.lm_head(cast.backbone.ln_f(hs[2]) @ w.T).float())


def test_fit_cast_matrices_recovers_a_linear_map():
    model = make("gpt2", vocab_projection_mode="SHARED_PROJECTION_CAST_OUTPUTS")
    batches = [ids(4, 16, seed=s) for s in range(4)]
    residuals = fit_cast_matrices(model, batches)
    assert set(residuals) == {1, 2}
    x = torch.cat(batches)
    hs = model(x, output_hidden_states=True).hidden_states
    for k in (1, 2):
        inputs = model.backbone.ln_f(hs[k]).reshape(-1, 32).double()
        target = hs[4].reshape(-1, 32).double()
        ref = torch.linalg.pinv(inputs) @ target  # independent least-squares solution
        torch.testing.assert_close(model.name_to_conv_matrix[f"{k}_to_4"].weight.T.double(), ref, atol=1e-3, rtol=1e-3)
        assert residuals[k] < 1.0


@pytest.mark.parametrize("kind", KINDS)
def test_exit_loss_is_sum_of_exit_cross_entropies(kind):
    model = make(kind)
    x = ids(2, 9)
    labels = x.clone()
    labels[0, :2] = -100
    loss = model(x, labels=labels).loss
    hs = model(x, output_hidden_states=True).hidden_states

    def ce(logits):
        return F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB).double(), labels[:, 1:].reshape(-1), ignore_index=-100)

    expected = sum(ce(model.exit_logits(hs, k)) for k in (1, 2, 4))
    torch.testing.assert_close(loss.double(), expected, atol=1e-5, rtol=1e-5)
    calm = AutoMultiExitModel.from_config(model.config, MEC())
    calm.load_state_dict(model.state_dict())
    calm.exit_loss_weighting = "calm"
    weighted = sum(k / 7 * ce(model.exit_logits(hs, k)) for k in (1, 2, 4))
    torch.testing.assert_close(calm.eval()(x, labels=labels).loss.double(), weighted, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_freeze_survives_save_and_load(kind, tmp_path):
    model = make(kind, freeze_parameters=True)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"name_to_lm_exit_head.lm_head_{k}.weight" for k in (1, 2, 4)}
    model.save_pretrained(tmp_path)
    loaded = AutoMultiExitModel.from_pretrained(tmp_path, MEC(freeze_parameters=True))
    assert {n for n, p in loaded.named_parameters() if p.requires_grad} == trainable
    loaded.train()
    loaded(ids(), labels=ids()).loss.backward()
    assert all(p.grad is None for n, p in loaded.named_parameters() if n not in trainable)
    assert all(loaded.get_parameter(n).grad is not None for n in trainable)


def test_checkpoint_round_trip_and_plain_load(tmp_path):
    model = make("moduleformer")
    model.save_pretrained(tmp_path)
    assert "lm_head_layer_indices" in (tmp_path / "config.json").read_text()
    x = ids()
    acd = MEC(use_original_head=False, contrast_layer_indices=("original", 2))
    loaded = AutoMultiExitModel.from_pretrained(tmp_path, acd)
    model.set_multi_exit_config(acd)
    torch.testing.assert_close(loaded(x).logits, model(x).logits)
    plain = AutoModelForCausalLM.from_pretrained(tmp_path)  # a plain ModuleFormer, exit heads unused
    model.set_multi_exit_config(MEC())
    torch.testing.assert_close(plain(x).logits, model(x).logits)


def test_runtime_indices_add_new_heads_to_train(tmp_path):
    make("gpt2").save_pretrained(tmp_path)
    model = AutoMultiExitModel.from_pretrained(tmp_path, MEC(lm_head_layer_indices=(3,), freeze_parameters=True))
    assert model.exit_layers == [3]
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {"name_to_lm_exit_head.lm_head_3.weight"}


@pytest.mark.parametrize("kind", KINDS)
def test_acd_generate_greedy_equals_manual_loop(kind):
    model = make(kind, use_original_head=False, contrast_layer_indices=("original", 2))
    prompt = ids(1, 4)
    out = model.generate(prompt, max_new_tokens=5, do_sample=False, pad_token_id=0)
    seq = prompt
    for _ in range(5):
        nxt = model(seq, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], 1)
    assert torch.equal(out, seq)
    beams = model.generate(prompt, max_new_tokens=4, num_beams=3, do_sample=False, pad_token_id=0)
    assert beams.shape == (1, 8)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(contrast_layer_indices=(4, 2)), "Contradiction"),
        (dict(use_original_head=False), "needs an exit"),
        (dict(use_original_head=False, contrast_layer_indices=(4, 2, 1)), "exactly two"),
        (dict(use_original_head=False, contrast_layer_indices=(4, 0)), "0 = embeddings"),
        (dict(use_original_head=False, output_layer_index=2, contrast_layer_indices=(4, 2)), "not both"),
        (dict(vocab_projection_mode="nope"), "vocab_projection_mode"),
        (dict(lm_head_layer_indices="2;x"), "neither an integer"),
    ],
)
def test_configuration_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MEC(**kwargs)


def test_string_forms_as_lm_eval_passes_them():
    cfg = MEC(lm_head_layer_indices="2;4", use_original_head="False", contrast_layer_indices="original;2",
              vocab_projection_mode="layer_specific_projection")
    assert cfg.lm_head_layer_indices == (2, 4) and cfg.use_original_head is False
    assert cfg.contrast_layer_indices == ("original", 2) and cfg.get_description() == "original_vs_2"
    assert MEC(use_original_head=False, output_layer_index="3").get_description() == "layer_3"


def test_model_level_validation(tmp_path):
    with pytest.raises(ValueError, match="out of range"):
        make("gpt2", lm_head_layer_indices=(5,))
    make("gpt2").save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="does not match the exit heads"):
        AutoMultiExitModel.from_pretrained(tmp_path, MEC(use_original_head=False, output_layer_index=3))
    with pytest.raises(ValueError, match="supports model types"):
        AutoMultiExitModel.from_config(GPT2Config(n_layer=1).__class__.__bases__[0]())
