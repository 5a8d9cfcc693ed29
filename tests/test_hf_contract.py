"""transformers' causal-LM contract on tiny ModuleFormers: what its common model tests (ModelTesterMixin,
GenerationTesterMixin) check of every in-tree model, written for ModuleFormer against independent references.

Covers: the cache under either name (``cache`` on transformers >= 5.24, ``past_key_values`` before) and its standard
layout, unknown keyword arguments, class attributes and config aliases, resizing and tying embeddings, config
defaults for outputs, ``return_dict=False``, ``logits_to_keep``, generation from ``inputs_embeds``, assisted
generation (draft model and ``assistant_early_exit``), generate's dict outputs, ``dtype`` / ``device_map`` loading,
and sequence-classification pooling.
"""
import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, GPTNeoConfig
from transformers.cache_utils import DynamicCache

from conftest import tiny_config_kwargs
from moduleformer_exit import (
    AutoMultiExitModel,
    ModuleFormerConfig,
    ModuleFormerForCausalLM,
    ModuleFormerForSequenceClassification,
    ModuleFormerModel,
    MultiExitConfiguration,
)
from moduleformer_exit.hf_compat import CACHE_NAME

VOCAB = 97


def ids(batch, length, seed=0):
    return torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def greedy(model, prompt, steps):
    """Reference greedy decoding: full forwards without any cache."""
    seq = prompt
    for _ in range(steps):
        nxt = model(seq, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], 1)
    return seq


def multi_exit(kind):
    torch.manual_seed(0)
    if kind == "moduleformer":
        config = ModuleFormerConfig(**tiny_config_kwargs(n_layer=3))
    elif kind == "gpt2":
        config = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=3, n_head=2, n_positions=64, pad_token_id=0)
    else:
        config = GPTNeoConfig(vocab_size=VOCAB, hidden_size=32, num_layers=3, num_heads=2, window_size=8,
                              attention_types=[[["global"], 3]], max_position_embeddings=64, pad_token_id=0)
    runtime = MultiExitConfiguration(lm_head_layer_indices=(1, 3), use_original_head=False,
                                     contrast_layer_indices=("original", 1))
    return AutoMultiExitModel.from_config(config, runtime).eval()


# ----------------------------------------------------------------------------------------------- the cache
def test_cache_is_accepted_under_both_names_and_returned_under_the_installed_one(tiny_model):
    model = tiny_model()
    x = ids(2, 7)
    full = model(x, use_cache=False).logits
    for name in ("cache", "past_key_values"):
        cache = DynamicCache(config=model.config)
        first = model(x[:, :4], use_cache=True, **{name: cache})
        assert getattr(first, CACHE_NAME) is cache
        second = model(x[:, 4:], use_cache=True, **{name: cache})
        torch.testing.assert_close(torch.cat([first.logits, second.logits], 1), full, atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="not both"):
        model(x, cache=DynamicCache(config=model.config), past_key_values=DynamicCache(config=model.config))


def test_cache_uses_the_standard_layout_and_crops(tiny_model):
    model = tiny_model()
    x = ids(2, 9)
    cache = DynamicCache(config=model.config)
    model(x, cache=cache, use_cache=True)
    c = model.config
    keys, values = cache.layers[0].keys, cache.layers[0].values
    assert tuple(keys.shape) == (2, c.n_head, 9, c.att_hidden // c.n_head)  # [B, n_head, S, head_size]
    assert tuple(values.shape) == tuple(keys.shape)
    # cropping (assisted decoding) then continuing equals a fresh run over the kept prefix
    cache.crop(-3)
    assert cache.get_seq_length() == 6
    continued = model(x[:, 6:], cache=cache, use_cache=True).logits
    torch.testing.assert_close(continued, model(x, use_cache=False).logits[:, 6:], atol=1e-5, rtol=1e-4)


def _forwards():
    torch.manual_seed(0)
    cfg = ModuleFormerConfig(**tiny_config_kwargs())
    yield "ModuleFormerModel", ModuleFormerModel(cfg).eval()
    yield "ModuleFormerForCausalLM", ModuleFormerForCausalLM(cfg).eval()
    yield "ModuleFormerForSequenceClassification", ModuleFormerForSequenceClassification(cfg).eval()
    for kind in ("moduleformer", "gpt2", "gpt_neo"):
        yield f"multi-exit {kind}", multi_exit(kind)


@pytest.mark.parametrize("name,model", list(_forwards()), ids=lambda v: v if isinstance(v, str) else "")
def test_unknown_keyword_raises_type_error_naming_it(name, model):
    x = ids(1, 4)
    model(x)  # the plain call works
    model(x, num_items_in_batch=4, cache_position=None)  # transformers' no-op arguments are accepted
    with pytest.raises(TypeError, match="'casche'"):
        model(x, casche=DynamicCache())
    with pytest.raises(TypeError, match="'output_scores'"):
        model(x, output_scores=True)


# ----------------------------------------------------------------------------------------------- class contract
def test_class_attributes_and_config_aliases(tiny_config):
    config = tiny_config()
    model = ModuleFormerForCausalLM(config)
    assert model.base_model_prefix == "transformer" and model.base_model is model.transformer
    assert set(model._no_split_modules) == {"ModuleFormerBlock"}
    assert model.supports_gradient_checkpointing
    assert config.num_hidden_layers == config.n_layer == 2
    assert config.hidden_size == config.n_embd and config.num_attention_heads == config.n_head
    assert config.intermediate_size == config.ffd_hidden
    assert config.num_experts == config.n_mlp_experts and config.num_experts_per_tok == config.k_mlp
    config.num_hidden_layers = 5  # aliases write IBM's fields
    assert config.n_layer == 5
    assert ModuleFormerConfig(hidden_size=64, n_head=2, att_hidden=32, num_experts=4, num_experts_per_tok=1).n_embd == 64


def test_resize_token_embeddings(tiny_model):
    model = tiny_model()
    x = ids(1, 5)
    before = model(x).logits
    model.resize_token_embeddings(VOCAB + 7)
    assert model.config.vocab_size == VOCAB + 7
    assert model.transformer.wte.weight.shape[0] == VOCAB + 7 and model.lm_head.weight.shape[0] == VOCAB + 7
    after = model(x).logits
    torch.testing.assert_close(after[..., :VOCAB], before)  # old tokens unchanged
    model(torch.tensor([[VOCAB + 6, 3]]))  # new ids are in the vocabulary now
    with pytest.raises(ValueError, match="vocabulary"):
        model(torch.tensor([[VOCAB + 7]]))


def test_tied_word_embeddings_survive_save_and_load(tiny_model, tmp_path):
    model = tiny_model(tie_word_embeddings=True)
    assert model.lm_head.weight is model.transformer.wte.weight
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert loaded.lm_head.weight is loaded.transformer.wte.weight
    x = ids(1, 6)
    assert torch.equal(loaded(x).logits, model(x).logits)


def test_output_flags_default_to_the_config(tiny_model):
    model = tiny_model(output_hidden_states=True, output_attentions=True, output_router_logits=True)
    out = model(ids(2, 5))
    assert len(out.hidden_states) == 3 and len(out.attentions) == 2 and len(out.router_logits) == 2
    plain = tiny_model()(ids(2, 5))
    assert plain.hidden_states is None and plain.attentions is None and plain.router_logits is None


def test_return_dict_false_in_the_config_gives_tuples(tiny_model):
    model = tiny_model(return_dict=False)
    out = model(ids(1, 4), use_cache=False)
    assert isinstance(out, tuple) and out[0].shape == (1, 4, VOCAB)
    assert isinstance(model.transformer(ids(1, 4), use_cache=False), tuple)


def test_logits_to_keep(tiny_model):
    model = tiny_model()
    x = ids(2, 8)
    full = model(x).logits
    torch.testing.assert_close(model(x, logits_to_keep=1).logits, full[:, -1:])
    torch.testing.assert_close(model(x, logits_to_keep=3).logits, full[:, -3:])
    torch.testing.assert_close(model(x, logits_to_keep=torch.tensor([0, 5])).logits, full[:, [0, 5]])


# ----------------------------------------------------------------------------------------------- generation
def test_generate_from_inputs_embeds_equals_generate_from_ids(tiny_model):
    model = tiny_model()
    x = ids(1, 5)
    from_ids = model.generate(x, max_new_tokens=6, do_sample=False, pad_token_id=0)
    from_embeds = model.generate(inputs_embeds=model.get_input_embeddings()(x), max_new_tokens=6, do_sample=False,
                                 pad_token_id=0)
    assert from_embeds.tolist() == from_ids[:, 5:].tolist()  # generate returns only new tokens for embeddings


def test_generate_with_a_draft_model_equals_plain_greedy(tiny_model):
    model, draft = tiny_model(seed=0), tiny_model(seed=1, n_layer=1)
    x = ids(1, 5)
    expected = greedy(model, x, 12)
    assisted = model.generate(x, assistant_model=draft, max_new_tokens=12, do_sample=False, pad_token_id=0)
    assert assisted.tolist() == expected.tolist()


@pytest.mark.parametrize("exit_layer", [1, 2])
def test_assistant_early_exit_equals_plain_greedy(tiny_model, exit_layer):
    # transformers drafts with the first `exit_layer` blocks (it lowers config.num_hidden_layers) and verifies with all
    model = tiny_model(n_layer=3)
    x = ids(1, 4)
    out = model.generate(x, assistant_early_exit=exit_layer, max_new_tokens=10, do_sample=False, pad_token_id=0)
    assert out.tolist() == greedy(model, x, 10).tolist()
    assert model.config.n_layer == 3  # restored


def test_generate_dict_outputs_have_consistent_shapes(tiny_model):
    model = tiny_model()
    x = ids(2, 4)
    out = model.generate(x, max_new_tokens=3, do_sample=False, pad_token_id=0, return_dict_in_generate=True,
                         output_attentions=True, output_hidden_states=True, output_scores=True)
    assert len(out.scores) == 3 and out.scores[0].shape == (2, VOCAB)
    heads = model.config.k_att * model.config.n_head
    first, last = out.attentions[0], out.attentions[-1]
    assert len(first) == model.config.n_layer
    assert tuple(first[0].shape) == (2, heads, 4, 4)  # prompt step: [B, k_att * n_head, T, S]
    assert tuple(last[0].shape) == (2, heads, 1, 6)  # a decode step attends over the cache
    assert len(out.hidden_states[0]) == model.config.n_layer + 1


@pytest.mark.parametrize("kind", ["moduleformer", "gpt2", "gpt_neo"])
def test_multi_exit_generation_with_cache_equals_without(kind):
    model = multi_exit(kind)
    x = ids(1, 5)
    kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(x, **kwargs), model.generate(x, use_cache=False, **kwargs))
    assert model.generate(x, **kwargs).tolist() == greedy(model, x, 8).tolist()


# ----------------------------------------------------------------------------------------------- loading
def test_from_pretrained_with_dtype_and_device_map(tiny_model, tmp_path):
    model = tiny_model()
    model.save_pretrained(tmp_path)
    low = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in low.parameters())
    mapped = AutoModelForCausalLM.from_pretrained(tmp_path, device_map="auto")
    assert {p.device.type for p in mapped.parameters()} == {"cpu"}
    x = ids(1, 6)
    assert torch.equal(mapped(x).logits, model(x).logits)


# ----------------------------------------------------------------------------------------------- classification
def test_sequence_classification_pools_the_last_real_token_for_ids_and_embeds(tiny_config):
    torch.manual_seed(0)
    model = ModuleFormerForSequenceClassification(tiny_config(num_labels=3)).eval()
    input_ids = torch.tensor([[0, 0, 5, 6, 7], [8, 9, 10, 0, 0], [4, 5, 6, 7, 8]])  # left, right, no padding
    mask = (input_ids != 0).long()
    last_real = [4, 2, 4]
    hidden = model.transformer(input_ids, attention_mask=mask).last_hidden_state
    expected = torch.stack([model.score(hidden[row, last_real[row]]) for row in range(3)])
    torch.testing.assert_close(model(input_ids, attention_mask=mask).logits, expected)
    unmasked = model.transformer(input_ids).last_hidden_state  # without a mask the pads are attended to
    expected_unmasked = torch.stack([model.score(unmasked[row, last_real[row]]) for row in range(3)])
    torch.testing.assert_close(model(input_ids).logits, expected_unmasked)  # last real token from pad_token_id
    embeds = model.transformer.wte(input_ids)
    torch.testing.assert_close(model(inputs_embeds=embeds, attention_mask=mask).logits, expected)
