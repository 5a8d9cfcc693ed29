"""Early-exit decoding (static, CALM, FREE, self-speculative) on tiny Llama and T5 (decoder exits; the encoder runs
once) multi-exit models, against independent references: HF ``generate``, the model's own cache-free forward of the
whole sequence (hidden states after k blocks), and the teacher-forced full model."""
import inspect

import pytest
import torch
from transformers import LlamaConfig, T5Config

from moduleformer_exit import AutoMultiExitModel
from moduleformer_exit.early_exit import EarlyExitConfig, LayerStack, generate_early_exit
from moduleformer_exit.hf_compat import output_cache
from moduleformer_exit.multi_exit_config import MultiExitConfiguration as MEC

VOCAB, L = 61, 4
KINDS = ["llama", "t5"]
# make() settings whose exits often agree with the top layer (drafts accepted, mixed CALM exits) on transformers 5.3
# and 5.24 alike (random initialisation differs between releases)
AGREE = {"llama": dict(seed=1, scale=0.3), "t5": dict(seed=3, scale=0.1, sharpen=3.0)}


def make(kind, seed=0, scale=None, sharpen=8.0, mode="LAYER_SPECIFIC_PROJECTION"):
    """Tiny multi-exit model, exits 1..L-1 (none in the DIRECT mode). ``scale`` shrinks the residual branches of blocks
    >= 1 and copies lm_head into the heads, so exits often agree with the full model (mixed exits, acceptance)."""
    torch.manual_seed(seed)
    if kind == "llama":
        config = LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=L,
                             num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                             pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
                             initializer_range=0.3)
    else:  # decoder deeper than the encoder; tied embeddings (exits rescaled by d_model ** -0.5)
        config = T5Config(vocab_size=VOCAB, d_model=16, d_kv=8, d_ff=32, num_layers=2, num_decoder_layers=L,
                          num_heads=2, decoder_start_token_id=0, pad_token_id=0, eos_token_id=2,
                          initializer_factor=2.0)
    layers = tuple(range(1, L)) if mode == "LAYER_SPECIFIC_PROJECTION" else (L,)
    model = AutoMultiExitModel.from_config(config, MEC(lm_head_layer_indices=layers, vocab_projection_mode=mode))
    model.eval()
    if scale is not None:
        with torch.no_grad():
            for block in (model.model.layers if kind == "llama" else model.decoder.block)[1:]:
                projections = ([block.self_attn.o_proj, block.mlp.down_proj] if kind == "llama" else
                               [block.layer[0].SelfAttention.o, block.layer[1].EncDecAttention.o,
                                block.layer[2].DenseReluDense.wo])
                for proj in projections:
                    proj.weight.mul_(scale)
            model.final_norm().weight.mul_(sharpen)  # peaked distributions: margins spread over [0, 1]
            for head in getattr(model, "name_to_lm_exit_head", {}).values():
                head.weight.copy_(model.lm_head.weight)
    return model


def inputs(kind, seed=0, batch=2):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(3, VOCAB, (batch, 6), generator=g)
    mask = torch.ones_like(x)
    if batch > 1:
        mask[1, :2] = 0  # left padding (Llama prompt) / padded encoder positions (T5)
    return x.masked_fill(mask == 0, 0), mask


def hf_greedy(model, x, mask, n, eos=None):
    return model.generate(x, attention_mask=mask, max_new_tokens=n, do_sample=False, eos_token_id=eos,
                          pad_token_id=0)


def run(model, x, cfg, n, mask=None, **kw):
    kw.setdefault("eos_token_id", [])
    return generate_early_exit(model, x, cfg, attention_mask=mask, max_new_tokens=n, pad_token_id=0, **kw)


def full_forward(model, kind, x, mask, seq):
    """The model's own cache-free forward of the whole (decoder) sequence ``seq``: (hidden states, logits)."""
    with torch.no_grad():
        if kind == "t5":
            out = model(input_ids=x, attention_mask=mask, decoder_input_ids=seq, output_hidden_states=True,
                        use_cache=False)
            return out.decoder_hidden_states, out.logits
        full_mask = torch.cat([mask, mask.new_ones(mask.shape[0], seq.shape[1] - mask.shape[1])], 1)
        out = model(seq, attention_mask=full_mask, output_hidden_states=True, use_cache=False)
        return out.hidden_states, out.logits


def new_part(kind, x, sequences):
    """Columns of ``sequences`` where the new tokens start (T5: after the decoder start token)."""
    return 1 if kind == "t5" else x.shape[1]


@pytest.mark.parametrize("kind", KINDS)
def test_full_and_static_top_equal_generate_with_padding_and_eos(kind):
    model = make(kind)
    x, mask = inputs(kind)
    ref = hf_greedy(model, x, mask, 10)
    start = new_part(kind, x, ref)
    eos = int(ref[0, start + 3])
    ref = hf_greedy(model, x, mask, 10, eos=eos)
    for cfg in (EarlyExitConfig("full"), EarlyExitConfig("static", exit_layer=L)):
        assert torch.equal(run(model, x, cfg, 10, mask, eos_token_id=eos).sequences, ref)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("k", [1, 3])
def test_static_exit_equals_cache_free_forward(kind, k):
    model = make(kind)
    x, mask = inputs(kind)
    out = run(model, x, EarlyExitConfig("static", exit_layer=k), 6, mask)
    seq = torch.zeros(2, 1, dtype=torch.long) if kind == "t5" else x
    head = model.name_to_lm_exit_head[f"lm_head_{k}"]
    for _ in range(6):  # state after k blocks of the whole sequence, through norm (+ T5's rescale) and head k
        h = full_forward(model, kind, x, mask, seq)[0][k][:, -1]
        scale = 16 ** -0.5 if kind == "t5" else 1.0
        seq = torch.cat([seq, head(model.final_norm()(h) * scale).argmax(-1, keepdim=True)], 1)
    assert torch.equal(out.sequences, seq)


@pytest.mark.parametrize("kind", KINDS)
def test_calm_extremes(kind):
    model = make(kind)
    x, mask = inputs(kind)
    out = run(model, x, EarlyExitConfig("calm", threshold=1.0), 8, mask)
    assert torch.equal(out.sequences, hf_greedy(model, x, mask, 8)) and bool((out.exit_layers == L).all())
    calm = run(model, x, EarlyExitConfig("calm", threshold=0.0, min_layer=2), 8, mask)
    static = run(model, x, EarlyExitConfig("static", exit_layer=2), 8, mask)
    assert torch.equal(calm.sequences, static.sequences) and bool((calm.exit_layers == 2).all())


@pytest.mark.parametrize("kind", KINDS)
def test_free_extremes(kind):
    model = make(kind)
    x, mask = inputs(kind)
    free = run(model, x, EarlyExitConfig("free", exit_layer=2, threshold=1.0), 8, mask)
    assert torch.equal(free.sequences, hf_greedy(model, x, mask, 8))
    free = run(model, x, EarlyExitConfig("free", exit_layer=2, threshold=0.0), 8, mask)
    assert torch.equal(free.sequences, run(model, x, EarlyExitConfig("static", exit_layer=2), 8, mask).sequences)


@pytest.mark.parametrize("kind", KINDS)
def test_free_parallel_catch_up_equals_sequential_computation(kind):
    """Blocks [2, L) over 4 queued tokens in one causal call == 4 single-token calls == the model's own forward
    (T5: the decoder with cross-attention over the encoder states, computed once)."""
    model = make(kind, seed=2)
    stack = LayerStack(model)
    x, mask = inputs(kind, seed=2, batch=1)
    seq = torch.randint(3, VOCAB, (1, 9), generator=torch.Generator().manual_seed(5))
    if kind == "t5":
        seq[0, 0] = 0
    with torch.no_grad():
        prompt, _ = stack.adapter.begin(x, None)
        if kind == "llama":
            seq = torch.cat([x, seq], 1)
        h = stack.run(stack.embed(seq), 0, 2, None, None)
        par, one = stack.new_cache(), stack.new_cache()
        stack.run(h[:, :5], 2, L, par, None)
        stack.run(h[:, :5], 2, L, one, None)
        out_par = stack.run(h[:, 5:], 2, L, par, None)
        out_one = torch.cat([stack.run(h[:, t: t + 1], 2, L, one, None) for t in range(5, seq.shape[1])], 1)
        hidden, logits = full_forward(model, kind, x, torch.ones_like(x), seq)
        top_logits = stack.logits(out_par, L)
    torch.testing.assert_close(out_par, out_one, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(stack.adapter.final_norm(out_par), hidden[L][:, 5:], atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(top_logits, logits[:, 5:], atol=2e-5, rtol=1e-4)  # T5: with the tied rescale
    for j in range(2, L):
        for a, b in ((stack.adapter.self_cache(par).layers[j], stack.adapter.self_cache(one).layers[j]),):
            torch.testing.assert_close(a.keys, b.keys, atol=2e-5, rtol=1e-4)
            torch.testing.assert_close(a.values, b.values, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("kind", KINDS)
def test_free_tokens_match_teacher_forced_full_model(kind):
    model = make(kind, seed=1, scale=0.3) if kind == "llama" else make(kind, seed=3, scale=0.3, sharpen=3.0)
    x, mask = inputs(kind, seed=4, batch=1)
    for threshold in (0.5, 0.3, 0.7, 0.2, 0.85, 0.95, 0.99):  # the first level giving shallow and deep tokens
        out = run(model, x, EarlyExitConfig("free", exit_layer=2, threshold=threshold), 14, mask, return_cache=True)
        if {2, L} <= set(out.exit_layers[0].tolist()):
            break
    assert {2, L} <= set(out.exit_layers[0].tolist()), "the test needs shallow and deep tokens"
    stack = LayerStack(model)
    hidden, logits = full_forward(model, kind, x, mask, out.sequences)
    start = new_part(kind, x, out.sequences)
    for i, e in enumerate(out.exit_layers[0].tolist()):
        p = start - 1 + i
        predicted = logits[0, p] if e == L else stack.logits(hidden[e][:, p: p + 1], e)[0, 0]
        assert int(predicted.argmax()) == int(out.sequences[0, start + i])
    if kind == "llama":  # every block's cache = the full model's K/V of the emitted text (deep blocks may lag)
        with torch.no_grad():
            fresh = output_cache(model(out.sequences[:, :-1], use_cache=True))
        for j in range(L):
            n = out.cache.layers[j].keys.shape[2]
            torch.testing.assert_close(out.cache.layers[j].keys, fresh.layers[j].keys[:, :, :n], atol=1e-5,
                                       rtol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("k,gamma", [(1, 3), (2, 2), (3, 5)])
def test_self_speculative_greedy_equals_plain_greedy(kind, k, gamma):
    model = make(kind, **AGREE[kind])
    x, mask = inputs(kind)
    out = run(model, x, EarlyExitConfig("self_speculative", exit_layer=k, gamma=gamma), 12, mask)
    assert torch.equal(out.sequences, hf_greedy(model, x, mask, 12))
    if k > 1:  # drafts are accepted (exit 1 of these random models rarely agrees with the top)
        assert out.stats["acceptance_rate"] > 0


@pytest.mark.parametrize("kind", KINDS)
def test_shared_projection_direct_drafts_without_new_heads(kind):
    """LayerSkip-style checkpoint: no exit heads; SHARED_PROJECTION_DIRECT reads layer 2 through the model's own
    norm and lm_head, which drafts for lossless self-speculative decoding."""
    model = make(kind, mode="SHARED_PROJECTION_DIRECT", **AGREE[kind])
    assert not hasattr(model, "name_to_lm_exit_head") or not len(model.name_to_lm_exit_head)
    x, mask = inputs(kind)
    out = run(model, x, EarlyExitConfig("self_speculative", exit_layer=2, gamma=3), 12, mask)
    assert torch.equal(out.sequences, hf_greedy(model, x, mask, 12))
    assert out.stats["acceptance_rate"] > 0
    static = run(model, x, EarlyExitConfig("static", exit_layer=2), 4, mask)
    model.set_multi_exit_config(MEC(vocab_projection_mode="SHARED_PROJECTION_DIRECT", use_original_head=False,
                                    output_layer_index=2))
    assert torch.equal(static.sequences, hf_greedy(model, x, mask, 4))  # = generate() from the DIRECT exit 2


def _llama_states_with_propagation(model, seq, exit_of_position):
    """Cache-free forward of ``seq`` [1, S] through the Llama blocks (HF's own modules, causal mask, rotary at
    positions 0..S-1) where position p's state freezes after exit_of_position[p] blocks (CALM's propagated state).
    Returns the states after each block and every block's keys / values [1, kvh, S, hd]."""
    from transformers.cache_utils import DynamicCache

    from moduleformer_exit.hf_compat import cache_kwargs

    backbone = model.model
    with torch.no_grad():
        h = backbone.embed_tokens(seq)
        length = seq.shape[1]
        positions = torch.arange(length)[None]
        rotary = backbone.rotary_emb(h, position_ids=positions)
        mask = torch.full((length, length), torch.finfo(h.dtype).min).triu(1)[None, None]
        frozen = torch.tensor(exit_of_position)[None, :, None]
        states, keys, values = [h], [], []
        for j, block in enumerate(backbone.layers):
            cache = DynamicCache(config=model.config)
            out = block(h, attention_mask=mask, position_ids=positions, position_embeddings=rotary, use_cache=True,
                        **cache_kwargs(cache))
            keys.append(cache.layers[j].keys)
            values.append(cache.layers[j].values)
            h = torch.where(frozen > j, out, h)
            states.append(h)
    return states, keys, values


def test_calm_llama_cache_equals_cache_free_forward_with_propagated_states():
    model = make("llama", seed=1, scale=0.3)
    x, _ = inputs("llama", seed=1, batch=1)
    for threshold in (0.5, 0.3, 0.7, 0.2, 0.85):  # the first level giving mixed exits
        cfg = EarlyExitConfig("calm", threshold=threshold, min_layer=1)
        out = run(model, x, cfg, 10, return_cache=True)
        seen = set(out.exit_layers[0].tolist())
        if len(seen) > 1 and L in seen:
            break
    assert len(seen) > 1 and L in seen, f"the test needs mixed exits, got {seen}"
    seq = out.sequences[:, :-1]  # the last token is not cached yet
    exits = [L] * x.shape[1] + out.exit_layers[0, 1:].tolist()  # position p's state exits where token p+1 came from
    states, keys, values = _llama_states_with_propagation(model, seq, exits)
    for j in range(L):  # propagated K/V of skipped blocks = rope(k_proj(norm(exit state))) at the token's position
        torch.testing.assert_close(out.cache.layers[j].keys, keys[j], atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(out.cache.layers[j].values, values[j], atol=2e-5, rtol=1e-4)
    stack = LayerStack(model)
    for i, e in enumerate(out.exit_layers[0].tolist()):
        p = x.shape[1] - 1 + i
        assert int(stack.logits(states[e][:, p: p + 1], e).argmax()) == int(out.sequences[0, x.shape[1] + i])


def test_t5_shallow_deep_loss_on_the_decoder():
    """FREE's own setting: shallow-deep CE on the T5 decoder through the shared head (unshifted, as T5's loss)."""
    from moduleformer_exit.early_exit.losses import shallow_deep_loss

    model = make("t5", mode="SHARED_PROJECTION_DIRECT")
    x, mask = inputs("t5")
    labels = torch.randint(3, VOCAB, (2, 5), generator=torch.Generator().manual_seed(9))
    out = model(input_ids=x, attention_mask=mask, labels=labels, output_hidden_states=True)
    hs = out.decoder_hidden_states
    parts = shallow_deep_loss(model, hs, labels, shallow=1, alpha=0.5)
    ce = torch.nn.functional.cross_entropy
    with torch.no_grad():
        shallow = model.lm_head(model.decoder.final_layer_norm(hs[1]) * 16 ** -0.5)
        deep = model.lm_head(hs[L] * 16 ** -0.5)
    assert parts["ce_shallow"].item() == pytest.approx(ce(shallow.flatten(0, 1), labels.flatten()).item(), rel=1e-5)
    assert parts["ce_deep"].item() == pytest.approx(ce(deep.flatten(0, 1), labels.flatten()).item(), rel=1e-5)
    expected = (1 * parts["ce_shallow"] + L * parts["ce_deep"]) / (1 + L) + 0.5 * parts["kd"]
    assert parts["loss"].item() == pytest.approx(expected.item(), rel=1e-6)


def _t5_states_with_propagation(model, x, seq, exit_of_position):
    """Cache-free forward of the decoder sequence ``seq`` [1, S] block by block through T5's own modules (causal mask,
    block 0's relative bias over the whole sequence, cross-attention to the encoder states of ``x``), position p's
    state frozen after exit_of_position[p] blocks. Returns the states after each block and the self-attention
    keys / values of every block."""
    from transformers.cache_utils import DynamicCache, EncoderDecoderCache

    from moduleformer_exit.hf_compat import cache_kwargs

    with torch.no_grad():
        encoded = model.encoder(input_ids=x).last_hidden_state
        h = model.decoder.embed_tokens(seq)
        length = seq.shape[1]
        mask = torch.full((length, length), torch.finfo(h.dtype).min).triu(1)[None, None]
        bias = model.decoder.block[0].layer[0].SelfAttention.compute_bias(length, length)
        # transformers 5.3's blocks take cache_position and read a given position_bias as bias + mask
        legacy = "cache_position" in inspect.signature(type(model.decoder.block[0]).forward).parameters
        kwargs = (dict(attention_mask=None, position_bias=bias + mask, cache_position=torch.arange(length),
                       use_cache=True) if legacy else dict(attention_mask=mask, position_bias=bias))
        frozen = torch.tensor(exit_of_position)[None, :, None]
        states, keys, values = [h], [], []
        for j, block in enumerate(model.decoder.block):
            cache = EncoderDecoderCache(DynamicCache(config=model.decoder.config),
                                        DynamicCache(config=model.decoder.config))
            out = block(h, encoder_hidden_states=encoded, **kwargs, **cache_kwargs(cache))[0]
            keys.append(cache.self_attention_cache.layers[j].keys)
            values.append(cache.self_attention_cache.layers[j].values)
            h = torch.where(frozen > j, out, h)
            states.append(h)
    return states, keys, values


def test_calm_t5_cache_equals_cache_free_forward_with_propagated_states():
    model = make("t5", **AGREE["t5"])
    x, _ = inputs("t5", seed=1, batch=1)
    for threshold in (0.5, 0.3, 0.7, 0.2, 0.85, 0.95):  # the first level giving mixed exits
        out = run(model, x, EarlyExitConfig("calm", threshold=threshold, min_layer=1), 10, return_cache=True)
        seen = set(out.exit_layers[0].tolist())
        if len(seen) > 1 and L in seen:
            break
    assert len(seen) > 1 and L in seen, f"the test needs mixed exits, got {seen}"
    seq = out.sequences[:, :-1]
    # the reference itself: with every state at full depth it reproduces the decoder's own hidden states
    plain_states, _, _ = _t5_states_with_propagation(model, x, seq, [L] * seq.shape[1])
    hidden, _ = full_forward(model, "t5", x, torch.ones_like(x), seq)
    torch.testing.assert_close(model.decoder.final_layer_norm(plain_states[L]), hidden[L], atol=1e-5, rtol=1e-5)
    exits = [L] + out.exit_layers[0, 1:].tolist()  # position p's state exits where token p+1 came from
    states, keys, values = _t5_states_with_propagation(model, x, seq, exits)
    cache = out.cache.self_attention_cache
    for j in range(L):
        torch.testing.assert_close(cache.layers[j].keys, keys[j], atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(cache.layers[j].values, values[j], atol=2e-5, rtol=1e-4)
    stack = LayerStack(model)
    for i, e in enumerate(out.exit_layers[0].tolist()):
        assert int(stack.logits(states[e][:, i: i + 1], e).argmax()) == int(out.sequences[0, 1 + i])


def test_t5_model_owned_shallow_deep_loss_and_generate_early_exit():
    """FREE's setting end to end: a T5 whose config asks for the shallow-deep loss returns it from its forward, and
    generate(early_exit=...) decodes with the encoder run once (= the function API)."""
    from moduleformer_exit.early_exit.losses import shallow_deep_loss

    torch.manual_seed(0)
    config = T5Config(vocab_size=VOCAB, d_model=16, d_kv=8, d_ff=32, num_layers=2, num_decoder_layers=L, num_heads=2,
                      decoder_start_token_id=0, pad_token_id=0, eos_token_id=2, exit_loss="shallow_deep",
                      shallow_exit=1, kd_alpha=0.5)
    model = AutoMultiExitModel.from_config(config, MEC(lm_head_layer_indices=(1,))).eval()
    x, mask = inputs("t5")
    labels = torch.randint(3, VOCAB, (2, 5), generator=torch.Generator().manual_seed(9))
    out = model(input_ids=x, attention_mask=mask, labels=labels, output_hidden_states=True)
    expected = shallow_deep_loss(model, out.decoder_hidden_states, labels, shallow=1, alpha=0.5)["loss"]
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-6)
    cfg = EarlyExitConfig("free", exit_layer=1, threshold=0.5)
    tokens = model.generate(x, attention_mask=mask, early_exit=cfg, max_new_tokens=6, eos_token_id=[],
                            pad_token_id=0)
    assert torch.equal(tokens, run(model, x, cfg, 6, mask).sequences)
