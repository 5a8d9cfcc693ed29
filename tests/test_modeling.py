"""ModuleFormer models: HF contract, hidden-state semantics, caches, padding, generation, checkpointing, dtypes."""
import pytest
import torch
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification
from transformers.cache_utils import DynamicCache

from moduleformer_exit import (
    ModuleFormerConfig,
    ModuleFormerForCausalLM,
    ModuleFormerForSequenceClassification,
    ModuleFormerModel,
)


def ids(batch, length, seed=0, vocab=97):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (batch, length), generator=g)


def test_auto_classes_are_registered(tiny_config):
    config = tiny_config()
    assert isinstance(AutoConfig.for_model("moduleformer"), ModuleFormerConfig)
    assert type(AutoModel.from_config(config)) is ModuleFormerModel
    assert type(AutoModelForCausalLM.from_config(config)) is ModuleFormerForCausalLM
    assert type(AutoModelForSequenceClassification.from_config(config)) is ModuleFormerForSequenceClassification


def test_parameter_names_follow_ibm_layout(tiny_model):
    names = dict(tiny_model().named_parameters())
    expected = {
        "transformer.wte.weight": (97, 32),
        "transformer.h.0.attn.q_proj.experts.weight": (4, 32, 16),
        "transformer.h.0.attn.q_proj.output_experts.weight": (4, 16, 32),
        "transformer.h.0.attn.q_proj.gate.w_gate.0.weight": (8, 32),
        "transformer.h.0.attn.q_proj.gate.w_gate.0.bias": (8,),
        "transformer.h.0.attn.q_proj.gate.w_gate.3.weight": (4, 8),
        "transformer.h.1.attn.k_proj.weight": (16, 32),
        "transformer.h.1.attn.v_proj.bias": (16,),
        "transformer.h.1.mlpf.experts.weight": (6, 32, 24),
        "transformer.h.1.mlpf.output_experts.weight": (6, 24, 32),
        "transformer.h.1.mlpf.gate.w_gate.3.weight": (6, 8),
        "transformer.h.1.ln_2.weight": (32,),
        "transformer.ln_f.bias": (32,),
        "lm_head.weight": (97, 32),
    }
    for name, shape in expected.items():
        assert tuple(names[name].shape) == shape, name
    assert not any("mask" in n or "cum_weight" in n for n, _ in tiny_model().named_buffers())


def test_hidden_states_semantics(tiny_model):
    model = tiny_model()
    x = ids(2, 7)
    out = model(x, output_hidden_states=True)
    hs = out.hidden_states
    assert len(hs) == model.config.n_layer + 1
    torch.testing.assert_close(hs[0], model.transformer.wte(x))
    block0 = model.transformer.h[0](hs[0], compute_aux=False)[0]
    torch.testing.assert_close(hs[1], block0)
    raw_last = model.transformer.h[1](hs[1], compute_aux=False)[0]
    torch.testing.assert_close(hs[2], model.transformer.ln_f(raw_last))
    assert torch.equal(model.lm_head(hs[-1]).float(), out.logits)
    assert out.logits.dtype == torch.float32


def test_loss_is_shifted_cross_entropy_plus_weighted_aux(tiny_model):
    model = tiny_model(aux_loss_weight=0.5)
    x = ids(2, 9)
    labels = x.clone()
    labels[0, :3] = -100
    out = model(x, labels=labels)
    logits = out.logits.double()
    flat_logits, flat_labels = logits[:, :-1].reshape(-1, 97), labels[:, 1:].reshape(-1)
    keep = flat_labels != -100
    ce = -(flat_logits[keep].log_softmax(-1).gather(1, flat_labels[keep, None])).mean()
    assert out.aux_loss is not None
    torch.testing.assert_close(out.loss.double(), ce + 0.5 * out.aux_loss.double(), atol=1e-5, rtol=1e-5)
    # weight 0: aux computed (reported) but not added
    model.config.aux_loss_weight = 0.0
    torch.testing.assert_close(model(x, labels=labels).loss.double(), ce, atol=1e-5, rtol=1e-5)
    # inference without labels skips the router statistics
    assert model(x).aux_loss is None


def test_incremental_decoding_equals_full_forward(tiny_model):
    model = tiny_model()
    x = ids(2, 12)
    full = model(x, use_cache=False).logits
    cache = DynamicCache(config=model.config)
    pieces = []
    for start, stop in [(0, 5), (5, 8), (8, 9), (9, 12)]:
        out = model(x[:, start:stop], past_key_values=cache, use_cache=True)
        assert out.past_key_values is cache
        pieces.append(out.logits)
    torch.testing.assert_close(torch.cat(pieces, 1), full, atol=1e-5, rtol=1e-4)
    assert cache.get_seq_length() == 12


def test_left_padding_is_exact(tiny_model):
    model = tiny_model()
    x = ids(1, 6, seed=3)
    alone = model(x).logits
    padded = torch.cat([torch.zeros(1, 4, dtype=torch.long), x], 1)
    mask = torch.cat([torch.zeros(1, 4, dtype=torch.long), torch.ones(1, 6, dtype=torch.long)], 1)
    out = model(padded, attention_mask=mask).logits
    torch.testing.assert_close(out[:, 4:], alone, atol=1e-5, rtol=1e-4)


def left_pad(prompts, pad_id=0):
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(input_ids)
    for row, prompt in enumerate(prompts):
        input_ids[row, width - len(prompt):] = torch.tensor(prompt)
        mask[row, width - len(prompt):] = 1
    return input_ids, mask


def test_generate_greedy_cache_equals_no_cache_and_left_padded_batch_equals_single(tiny_model):
    model = tiny_model()
    prompts = [ids(1, n, seed=n)[0].tolist() for n in (3, 6, 5)]
    input_ids, mask = left_pad(prompts)
    kwargs = dict(max_new_tokens=7, do_sample=False, pad_token_id=0)
    cached = model.generate(input_ids, attention_mask=mask, **kwargs)
    uncached = model.generate(input_ids, attention_mask=mask, use_cache=False, **kwargs)
    assert torch.equal(cached, uncached)
    for row, prompt in enumerate(prompts):
        single = model.generate(torch.tensor([prompt]), **kwargs)
        assert cached[row, -7:].tolist() == single[0, -7:].tolist()


def test_generate_beam_search_and_sampling(tiny_model):
    model = tiny_model()
    x = ids(2, 4)
    beam = dict(max_new_tokens=5, num_beams=3, num_return_sequences=2, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(x, **beam), model.generate(x, use_cache=False, **beam))
    sample = dict(max_new_tokens=6, do_sample=True, top_k=20, pad_token_id=0)
    torch.manual_seed(7)
    a = model.generate(x, **sample)
    torch.manual_seed(7)
    b = model.generate(x, use_cache=False, **sample)
    assert torch.equal(a, b)


def test_generation_runs_past_block_size_and_history(tiny_model):
    # No position embeddings and no cache truncation: context is unlimited (block_size + history_length = 16 here).
    model = tiny_model()
    x = ids(1, 5)
    out = model.generate(x, max_new_tokens=30, do_sample=False, pad_token_id=0)
    assert out.shape[1] == 35
    full = model(out).logits
    cache = model(out[:, :-1], use_cache=True).past_key_values
    step = model(out[:, -1:], past_key_values=cache).logits
    torch.testing.assert_close(step[:, -1], full[:, -1], atol=1e-5, rtol=1e-4)


def test_bad_inputs_raise_clear_errors(tiny_model):
    model = tiny_model()
    with pytest.raises(ValueError, match="vocabulary"):
        model(torch.tensor([[1, 2, 97]]))
    with pytest.raises(ValueError, match="vocabulary"):
        model(torch.tensor([[1, -3]]))
    cache = model(ids(1, 4), use_cache=True).past_key_values
    with pytest.raises(ValueError, match="past \\+ new"):
        model(ids(1, 2), attention_mask=torch.tensor([[1, 0]]), past_key_values=cache)
    with pytest.raises(TypeError, match="Cache"):
        model(ids(1, 2), past_key_values=((torch.zeros(1), torch.zeros(1)),))
    with pytest.raises(ValueError, match="2-D"):
        model(ids(1, 3), attention_mask=torch.ones(1, 1, 3, 3))


def test_gradient_checkpointing_gives_same_loss_and_grads(tiny_model):
    x = ids(2, 8)
    results = []
    for checkpointing in (False, True):
        model = tiny_model(seed=1, sample_topk=1, aux_loss_weight=0.1).train()
        if checkpointing:  # the 5.x name since 5.2x; gradient_checkpointing_enable on older releases
            (getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable)()
        torch.manual_seed(5)  # sample_topk draws: checkpoint recompute must replay the same RNG
        loss = model(x, labels=x).loss
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    torch.testing.assert_close(results[0][0], results[1][0])
    for name, grad in results[0][1].items():
        torch.testing.assert_close(results[1][1][name], grad, atol=1e-6, rtol=1e-5, msg=name)


def test_bf16_forward_tracks_fp32(tiny_model):
    model = tiny_model()
    x = ids(2, 10)
    ref = model(x).logits
    low = model.to(torch.bfloat16)(x).logits
    assert low.dtype == torch.float32  # logits always float32
    assert torch.isfinite(low).all()
    assert (low - ref).abs().max() < 0.05 * ref.abs().max() + 0.05


def test_router_logits_for_usage_statistics(tiny_model):
    model = tiny_model()
    out = model(ids(2, 5), output_router_logits=True)
    assert len(out.router_logits) == 2
    att, mlp = out.router_logits[0]
    assert att.shape == (10, 4) and mlp.shape == (10, 6)


def naive_stick_breaking_weights(q, k, mask=None):
    """float64 loop over the definition: A_ij = z_ij * prod_{j<m<=i} (1 - z_im), z = sigmoid(q_i.k_j / sqrt(D));
    masked keys get weight 0 and do not break the stick. q [B, T, K, H, D], k [B, S, H, D] -> [B, K, H, T, S]."""
    B, T, K, H, D = q.shape
    S = k.shape[1]
    out = torch.zeros(B, K, H, T, S, dtype=torch.float64)
    for b in range(B):
        for kk in range(K):
            for h in range(H):
                for t in range(T):
                    i = S - T + t
                    remaining = 1.0
                    for j in range(i, -1, -1):
                        if mask is not None and mask[b, j] == 0:
                            continue
                        z = torch.sigmoid(q[b, t, kk, h].double() @ k[b, j, h].double() / D ** 0.5).item()
                        out[b, kk, h, t, j] = z * remaining
                        remaining *= 1 - z
    return out


def test_stick_breaking_weights_match_the_definition():
    from moduleformer_exit.attention import stick_breaking_weights

    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 3, 2, 2, 4, generator=g), torch.randn(2, 5, 2, 4, generator=g)
    mask = torch.tensor([[0, 1, 1, 1, 1], [1, 1, 0, 1, 1]])
    for m in (None, mask):
        torch.testing.assert_close(stick_breaking_weights(q, k, m).double(), naive_stick_breaking_weights(q, k, m),
                                   atol=1e-6, rtol=1e-5)


def test_output_attentions_are_4d_on_the_autograd_path_and_give_the_same_output(tiny_model):
    model = tiny_model()
    x = ids(1, 6)
    out = model(x, output_attentions=True)
    assert len(out.attentions) == 2
    weights = out.attentions[0]
    assert weights.shape == (1, 2 * 2, 6, 6)  # [B, k_att * n_head, T, S]
    assert torch.all(weights.triu(1) == 0)  # causal
    assert torch.all(weights.diagonal(dim1=-2, dim2=-1) > 0)  # the diagonal is attended
    torch.testing.assert_close(out.logits, model(x).logits, atol=1e-5, rtol=1e-4)  # eager path == kernel path
    weights.retain_grad()
    out.logits.sum().backward()
    assert weights.grad is not None and weights.grad.abs().sum() > 0


def test_save_and_reload_with_auto_class(tiny_model, tmp_path):
    model = tiny_model(gate_type="gmm")
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    x = ids(2, 6)
    assert torch.equal(loaded(x).logits, model(x).logits)


def test_return_dict_false_gives_tuple(tiny_model):
    out = tiny_model()(ids(1, 3), return_dict=False, use_cache=False)
    assert isinstance(out, tuple) and out[0].shape == (1, 3, 97)


def test_sequence_classification_pools_last_real_token(tiny_config):
    torch.manual_seed(0)
    model = ModuleFormerForSequenceClassification(tiny_config(num_labels=3)).eval()
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12]]
    input_ids, mask = left_pad(prompts)
    out = model(input_ids, attention_mask=mask, labels=torch.tensor([0, 2]))
    for row, prompt in enumerate(prompts):
        alone = model(torch.tensor([prompt])).logits[0]
        torch.testing.assert_close(out.logits[row], alone, atol=1e-5, rtol=1e-4)
    expected = torch.nn.functional.cross_entropy(out.logits, torch.tensor([0, 2]))
    torch.testing.assert_close(out.loss, expected)
    right = torch.tensor([[5, 6, 7, 0, 0]])
    torch.testing.assert_close(model(right).logits[0], model(torch.tensor([[5, 6, 7]])).logits[0],
                               atol=1e-5, rtol=1e-4)
