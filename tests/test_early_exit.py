"""Early-exit decoding (static, CALM, FREE, self-speculative) on tiny ModuleFormer, GPT-2 and GPT-Neo (local layers
with a window shorter than the sequences) multi-exit models, against independent references: HF greedy, a
truncated cache-free model, a cache-free full-prefix forward with propagated states, the teacher-forced full model,
exact sequence probabilities, and the FREE repository's Beta-mixture regression table."""
import math

import numpy as np
import pytest
import torch
from transformers import GPT2Config, GPTNeoConfig
from transformers.cache_utils import DynamicCache

from conftest import tiny_config_kwargs
from moduleformer_exit import ModuleFormerConfig, ModuleFormerForCausalLM
from moduleformer_exit.hf_compat import cache_kwargs, output_cache
from moduleformer_exit.early_exit import BetaMixtureThreshold, EarlyExitConfig, LayerStack, generate_early_exit
from moduleformer_exit.multi_exit_config import MultiExitConfiguration as MEC
from moduleformer_exit.multi_exit_models import AutoMultiExitModel

VOCAB = 97
L = 4
BACKBONES = ["moduleformer", "gpt2", "gpt_neo"]


def backbone_config(backbone, n_layer=L, vocab=VOCAB, **overrides):
    """Tiny fp32 configs; GPT-Neo alternates global and local layers with a window (4) shorter than the sequences."""
    if backbone == "moduleformer":
        return ModuleFormerConfig(**tiny_config_kwargs(n_layer=n_layer, vocab_size=vocab, **overrides))
    ids = dict(bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
    ids.update(overrides)
    if backbone == "gpt2":
        return GPT2Config(vocab_size=vocab, n_embd=32, n_layer=n_layer, n_head=2, n_positions=64, **ids)
    return GPTNeoConfig(vocab_size=vocab, hidden_size=32, num_layers=n_layer, num_heads=2, intermediate_size=48,
                        attention_types=[[["global", "local"], n_layer // 2]], window_size=4,
                        max_position_embeddings=64, **ids)


def residual_outputs(backbone, block):
    """The output projections of a block's attention and MLP branches (scaled to make exits agree)."""
    if backbone == "moduleformer":
        return [block.mlpf.output_experts, block.attn.q_proj.output_experts]
    if backbone == "gpt2":
        return [block.attn.c_proj, block.mlp.c_proj]
    return [block.attn.attention.out_proj, block.mlp.c_proj]


def make(backbone="moduleformer", seed=0, scale=None, n_layer=L, vocab=VOCAB, copy_heads=True, sharpen=40.0,
         **overrides):
    """A tiny multi-exit model with heads at 1..L-1. ``scale``: shrink the residual contributions of blocks
    >= 1 and copy lm_head into the exit heads, so exits mostly agree with the full model (acceptance > 0)."""
    torch.manual_seed(seed)
    config = backbone_config(backbone, n_layer, vocab, **overrides)
    model = AutoMultiExitModel.from_config(config, MEC(lm_head_layer_indices=tuple(range(1, n_layer)))).eval()
    if scale is not None:
        with torch.no_grad():
            for block in model.transformer.h[1:]:
                for proj in residual_outputs(backbone, block):
                    proj.weight.mul_(scale)
                    if getattr(proj, "bias", None) is not None:
                        proj.bias.mul_(scale)
            model.lm_head.weight.mul_(sharpen)  # peaked distributions: softmax margins spread over [0, 1]
            if copy_heads:
                for head in model.name_to_lm_exit_head.values():
                    head.weight.copy_(model.lm_head.weight)
    return model


def block_reference(model, j, h):
    """Cache-free forward of block ``j`` over the whole sequence ``h`` [1, S, D] through the model's own module
    (HF's causal masking for GPT) and the K/V it writes into a fresh cache: (out, keys, values)."""
    cache = DynamicCache(config=model.config)
    block = model.transformer.h[j]
    if isinstance(model.config, ModuleFormerConfig):
        out = block(h, None, cache, False, False)[0]
    elif isinstance(model.config, GPT2Config):
        out = block(h, attention_mask=None, use_cache=True, **cache_kwargs(cache))
    else:
        out = block(h, layer_past=cache, attention_mask=None, use_cache=True)[0]
    return out, cache.layers[j].keys, cache.layers[j].values


def prompts(batch=2, length=5, seed=0, vocab=VOCAB):
    return torch.randint(3, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def hf_greedy(model, x, n, mask=None, eos=None):
    return model.generate(x, attention_mask=mask, max_new_tokens=n, do_sample=False, eos_token_id=eos,
                          pad_token_id=0)


def run(model, x, cfg, n, **kw):
    kw.setdefault("eos_token_id", [])
    return generate_early_exit(model, x, cfg, max_new_tokens=n, pad_token_id=0, **kw)


def padded_batch():
    x = prompts(3, 6, seed=3)
    mask = torch.ones_like(x)
    mask[1, :2] = 0
    mask[2, :4] = 0
    x = x.masked_fill(mask == 0, 0)
    return x, mask


# --------------------------------------------------------------------------------------------------- static
@pytest.mark.parametrize("backbone", BACKBONES)
def test_static_at_top_and_full_equal_plain_greedy_with_padding_and_eos(backbone):
    model = make(backbone)
    x, mask = padded_batch()
    ref = hf_greedy(model, x, 12, mask)
    eos = int(ref[0, 6 + 4])  # an id the first row emits mid-way: it stops there, the others go on or stop
    ref = hf_greedy(model, x, 12, mask, eos=eos)
    for cfg in (EarlyExitConfig("static", exit_layer=L), EarlyExitConfig("full")):
        out = run(model, x, cfg, 12, attention_mask=mask, eos_token_id=eos)
        assert torch.equal(out.sequences, ref)
        assert bool((out.exit_layers[out.sequences[:, 6:] != 0] == L).all())


@pytest.mark.parametrize("backbone", BACKBONES)
@pytest.mark.parametrize("k", [1, 2, 3])
def test_static_exit_equals_cache_free_truncated_model(backbone, k):
    model = make(backbone)
    x = prompts()
    out = run(model, x, EarlyExitConfig("static", exit_layer=k), 8)
    seq = x
    ln_f, head = model.transformer.ln_f, model.name_to_lm_exit_head[f"lm_head_{k}"]
    with torch.no_grad():
        for _ in range(8):  # naive: the model's own cache-free forward over the whole sequence, state after k blocks
            h = model(seq, output_hidden_states=True).hidden_states[k]
            seq = torch.cat([seq, head(ln_f(h[:, -1])).argmax(-1, keepdim=True)], 1)
    assert torch.equal(out.sequences, seq)
    assert out.stats["layers_per_token"] == pytest.approx(k * 7 / 8)  # the first token comes from the prefill


# --------------------------------------------------------------------------------------------------- CALM
@pytest.mark.parametrize("backbone", BACKBONES)
def test_calm_never_exits_at_threshold_one_and_always_at_zero(backbone):
    model = make(backbone)
    x, mask = padded_batch()
    ref = hf_greedy(model, x, 10, mask)
    out = run(model, x, EarlyExitConfig("calm", threshold=1.0), 10, attention_mask=mask)
    assert torch.equal(out.sequences, ref) and bool((out.exit_layers == L).all())
    static = run(model, x, EarlyExitConfig("static", exit_layer=2), 10, attention_mask=mask)
    calm = run(model, x, EarlyExitConfig("calm", threshold=0.0, min_layer=2), 10, attention_mask=mask)
    assert torch.equal(calm.sequences, static.sequences) and bool((calm.exit_layers == 2).all())


def _reference_states(model, seq, exit_of_position):
    """Cache-free forward of ``seq`` [1, S] where position p's state freezes after exit_of_position[p] blocks
    (CALM's propagated state). Returns per-block keys / values [1, nh, S, hs] and the states after each block."""
    with torch.no_grad():
        h = model(seq, output_hidden_states=True).hidden_states[0]  # the embedding (positions 0..S-1)
    states, keys, values = [h], [], []
    frozen = torch.tensor(exit_of_position)[None, :, None]
    for j in range(L):
        out, k, v = block_reference(model, j, h)
        keys.append(k)
        values.append(v)
        h = torch.where(frozen > j, out, h)
        states.append(h)
    return states, keys, values


@pytest.mark.parametrize("backbone", BACKBONES)
@pytest.mark.parametrize("confidence,levels", [("softmax", (0.5, 0.3, 0.7)),
                                               ("saturation", (0.999, 0.995, 0.99, 0.98))])
def test_calm_cache_equals_full_prefix_forward_with_propagated_states(backbone, confidence, levels):
    model = make(backbone, seed=1, scale=0.3)
    x = prompts(1, 5, seed=1)
    for threshold in levels:  # the first level giving mixed exits (random weights differ across releases)
        cfg = EarlyExitConfig("calm", threshold=threshold, min_layer=1, confidence=confidence)
        final = run(model, x, cfg, 10)
        layers_seen = set(final.exit_layers[0].tolist())
        if len(layers_seen) > 1 and L in layers_seen:
            break
    assert len(layers_seen) > 1 and L in layers_seen, f"the test needs mixed exits, got {layers_seen}"
    stack = LayerStack(model)
    with torch.no_grad():
        for n in range(1, 11):  # after every step (each run is deterministic and stops after n tokens)
            out = run(model, x, cfg, n, return_cache=True)
            assert torch.equal(out.sequences, final.sequences[:, : 5 + n])
            seq = out.sequences[:, :-1]  # the last token is not cached yet
            exits = [L] * 5 + out.exit_layers[0, 1:].tolist()  # position p's state exits where token p+1 came from
            states, keys, values = _reference_states(model, seq, exits)
            for j in range(L):
                torch.testing.assert_close(out.cache.layers[j].keys, keys[j], atol=2e-5, rtol=1e-4)
                torch.testing.assert_close(out.cache.layers[j].values, values[j], atol=2e-5, rtol=1e-4)
            # each token is the argmax of its exit's head on the reference state
            for i in range(n):
                p, e = 4 + i, int(out.exit_layers[0, i])
                assert int(stack.logits(states[e][:, p: p + 1], e).argmax()) == int(out.sequences[0, 5 + i])


def test_calm_decaying_threshold_schedule():
    from moduleformer_exit.early_exit.calm import calm_threshold

    cfg = EarlyExitConfig("calm", threshold=0.5, decay_temperature=4.0)
    assert calm_threshold(cfg, 0, 10) == pytest.approx(0.9 * 0.5 + 0.1)
    assert calm_threshold(cfg, 5, 10) == pytest.approx(0.45 + 0.1 * math.exp(-2.0))


# --------------------------------------------------------------------------------------------------- FREE
@pytest.mark.parametrize("backbone", BACKBONES)
def test_free_extremes_equal_full_and_static_shallow(backbone):
    model = make(backbone)
    x, mask = padded_batch()
    assert torch.equal(run(model, x, EarlyExitConfig("free", exit_layer=2, threshold=1.0), 10,
                           attention_mask=mask).sequences, hf_greedy(model, x, 10, mask))
    free = run(model, x, EarlyExitConfig("free", exit_layer=2, threshold=0.0), 10, attention_mask=mask)
    static = run(model, x, EarlyExitConfig("static", exit_layer=2), 10, attention_mask=mask)
    assert torch.equal(free.sequences, static.sequences)
    assert free.stats["layers_per_token"] == pytest.approx(2 * 9 / 10)


@pytest.mark.parametrize("backbone", BACKBONES)
def test_free_parallel_catch_up_equals_sequential_blocks(backbone):
    model = make(backbone, seed=2)
    stack = LayerStack(model)
    x = prompts(2, 9, seed=2)
    with torch.no_grad():
        h = stack.run(stack.embed(x), 0, 2, None, None)
        par, seq = stack.new_cache(), stack.new_cache()
        stack.run(h[:, :5], 2, L, par, None)
        stack.run(h[:, :5], 2, L, seq, None)
        out_par = stack.run(h[:, 5:], 2, L, par, None)  # 4 queued tokens in one causal forward
        out_seq = torch.cat([stack.run(h[:, t: t + 1], 2, L, seq, None) for t in range(5, 9)], 1)
        # and both equal the model's own cache-free forward of the whole sequence (state after the top block)
        full = model(x, output_hidden_states=True).hidden_states
        ref = block_reference(model, L - 1, full[L - 1])[0]
    torch.testing.assert_close(out_par, out_seq, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out_par, ref[:, 5:], atol=1e-5, rtol=1e-5)
    for j in range(2, L):
        torch.testing.assert_close(par.layers[j].keys, seq.layers[j].keys, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(par.layers[j].values, seq.layers[j].values, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backbone", BACKBONES)
@pytest.mark.parametrize("adaptive", [False, True])
def test_free_tokens_match_teacher_forced_full_model(backbone, adaptive):
    model = make(backbone, seed=1, scale=0.3)
    x = prompts(1, 5, seed=4)
    cfg = EarlyExitConfig("free", exit_layer=2, threshold=0.5, adaptive_threshold=adaptive)
    calibrator = BetaMixtureThreshold(initial_threshold=0.5) if adaptive else None
    out = run(model, x, cfg, 16, calibrator=calibrator, return_cache=True)
    assert {2, L} <= set(out.exit_layers[0].tolist()), "the test needs shallow and deep tokens"
    if adaptive:  # the second call runs at the threshold refitted on the first call's pairs
        out = run(model, x, cfg, 16, calibrator=calibrator, return_cache=True)
    with torch.no_grad():  # every block's cache = the full model's K/V of the emitted text (deep blocks may lag)
        fresh_cache = output_cache(model(out.sequences[:, :-1], use_cache=True))
    for j in range(L):
        n = out.cache.layers[j].keys.shape[2]
        assert n == (out.sequences.shape[1] - 1 if j < 2 else n) and n >= 5
        torch.testing.assert_close(out.cache.layers[j].keys, fresh_cache.layers[j].keys[:, :, :n], atol=1e-5,
                                   rtol=1e-5)
    if adaptive:
        assert calibrator.fits == 1 and calibrator.labels
        assert any(abs(out.stats["thresholds"][0] - float(g)) < 1e-9 for g in calibrator.grid)
    with torch.no_grad():
        full = model(out.sequences, output_hidden_states=True)
    stack = LayerStack(model)
    for i, e in enumerate(out.exit_layers[0].tolist()):
        p = 4 + i
        predicted = (full.logits[0, p] if e == L else stack.logits(full.hidden_states[e][:, p: p + 1], e)[0, 0])
        assert int(predicted.argmax()) == int(out.sequences[0, 5 + i])


# --------------------------------------------------------------------------------------------------- self-spec
@pytest.mark.parametrize("backbone", BACKBONES)
@pytest.mark.parametrize("k,gamma", [(1, 1), (1, 4), (2, 3), (3, 2), (3, 6)])
def test_self_speculative_greedy_equals_plain_greedy(backbone, k, gamma):
    model = make(backbone, seed=5, scale=0.3)
    x, mask = padded_batch()
    ref = hf_greedy(model, x, 20, mask)
    eos = int(ref[0, 6 + 9])  # stops row 0 inside a block
    ref = hf_greedy(model, x, 20, mask, eos=eos)
    out = run(model, x, EarlyExitConfig("self_speculative", exit_layer=k, gamma=gamma), 20, attention_mask=mask,
              eos_token_id=eos)
    assert torch.equal(out.sequences, ref)
    assert out.stats["acceptance_rate"] > 0.1  # drafts are really accepted (not a 1-token-per-step loop)


@pytest.mark.parametrize("backbone", BACKBONES)
def test_self_speculative_batch_one_and_cache_equals_fresh_forward(backbone):
    model = make(backbone, seed=6, scale=0.3)
    x = prompts(1, 4, seed=6)
    ref = hf_greedy(model, x, 15)
    out = run(model, x, EarlyExitConfig("self_speculative", exit_layer=2, gamma=3), 15, return_cache=True)
    assert torch.equal(out.sequences, ref)
    # the cache after cropping holds exactly the full model's K/V of the kept positions
    keep = out.cache.layers[0].keys.shape[2]
    with torch.no_grad():
        fresh_cache = output_cache(model(out.sequences[:, :keep], use_cache=True))
    for j in range(L):
        torch.testing.assert_close(out.cache.layers[j].keys, fresh_cache.layers[j].keys, atol=1e-5, rtol=1e-5)


def _chi_square_p(observed, expected):
    """Upper-tail p-value of Pearson's statistic; cells with expected < 5 are pooled, in order of their expected
    count, into groups of expected >= 5 (the grouping depends on the expected counts only)."""
    order = np.argsort(expected)
    obs, exp, acc_o, acc_e = [], [], 0.0, 0.0
    for i in order:
        acc_o, acc_e = acc_o + observed[i], acc_e + expected[i]
        if acc_e >= 5:
            obs.append(acc_o)
            exp.append(acc_e)
            acc_o = acc_e = 0.0
    if acc_e > 0:  # the remainder joins the last group
        obs[-1] += acc_o
        exp[-1] += acc_e
    obs, exp = np.array(obs), np.array(exp)
    stat = float(((obs - exp) ** 2 / exp).sum())
    dof = len(obs) - 1
    assert dof >= 3, "too few samples for a chi-square test"
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64),
                                         torch.tensor(stat / 2, dtype=torch.float64)))


def _exact_and_sampled(model, prompt, vocab, n_new, outputs, temperature):
    """Observed counts of the sampled continuations and their exact expected counts under the full model."""
    codes = (outputs[:, prompt.shape[1]:] * (vocab ** torch.arange(n_new - 1, -1, -1))).sum(1)
    observed = np.bincount(codes.numpy(), minlength=vocab ** n_new).astype(float)
    grid = torch.cartesian_prod(*[torch.arange(vocab)] * n_new)  # every continuation, exact probability
    with torch.no_grad():
        logits = model(torch.cat([prompt.expand(len(grid), -1), grid], 1)).logits.double() / temperature
    logp = torch.log_softmax(logits, -1)
    start = prompt.shape[1] - 1
    seq_logp = sum(logp[:, start + t].gather(-1, grid[:, t: t + 1])[:, 0] for t in range(n_new))
    expected = seq_logp.exp().numpy() * len(outputs)
    assert abs(expected.sum() - len(outputs)) < 1e-6
    return observed, expected


@pytest.mark.parametrize("backbone", BACKBONES)
def test_self_speculative_sampling_matches_exact_sequence_distribution(backbone):
    vocab, n_new = 6, 3
    model = make(backbone, seed=7, scale=1.0, vocab=vocab, sharpen=4.0, copy_heads=False, bos_token_id=1,
                 eos_token_id=2, pad_token_id=0)
    prompt = torch.tensor([[3, 4, 5]])
    cfg = EarlyExitConfig("self_speculative", exit_layer=1, gamma=2, do_sample=True, temperature=0.7)
    # one batch of 4000 rows: batch-synchronous acceptance, every row its own outcome at the first index
    out = run(model, prompt.expand(4000, 3), cfg, n_new, generator=torch.Generator().manual_seed(0))
    assert _chi_square_p(*_exact_and_sampled(model, prompt, vocab, n_new, out.sequences, 0.7)) > 1e-3
    # batch 1 (multi-token acceptance and the bonus token): 150 independent generations
    generator = torch.Generator().manual_seed(1)
    runs = [run(model, prompt, cfg, n_new, generator=generator) for _ in range(150)]
    rate = sum(r.stats["acceptance_rate"] for r in runs) / len(runs)
    assert 0.2 < rate < 0.95, rate  # both acceptances and residual resampling happen
    sequences = torch.cat([r.sequences for r in runs])
    assert _chi_square_p(*_exact_and_sampled(model, prompt, vocab, n_new, sequences, 0.7)) > 1e-3


# --------------------------------------------------------------------------------------------------- BMM
def test_beta_mixture_reproduces_free_repository_table():
    rng = np.random.default_rng(0)
    table = [(0.7, (2, 5), (8, 1.5), (2.01, 5.14), (7.88, 1.52), 0.6333),
             (0.8, (3, 3), (4, 2), (2.81, 2.73), (4.07, 2.07), 0.5),
             (0.95, (1, 3), (20, 1), (0.81, 2.42), (20.13, 0.98), 0.8333)]
    for p, disagree, agree, fit_dis, fit_agr, thr in table:
        y = rng.random(3000) < p
        x = np.where(y, rng.beta(*agree, 3000), rng.beta(*disagree, 3000))
        bmm = BetaMixtureThreshold(repo_compat=True)
        bmm.fit(torch.tensor(x), torch.tensor(y))
        assert (round(float(bmm.alphas[0]), 2), round(float(bmm.betas[0]), 2)) == fit_dis
        assert (round(float(bmm.alphas[1]), 2), round(float(bmm.betas[1]), 2)) == fit_agr
        assert round(bmm.threshold(), 4) == thr


def test_beta_mixture_degenerate_cases_and_schedule():
    bmm = BetaMixtureThreshold()
    assert bmm.threshold() == 0.9 and bmm.maybe_refit() == 0.9  # nothing to fit yet
    bmm.fit(torch.rand(200, generator=torch.Generator().manual_seed(0)), torch.ones(200, dtype=torch.bool))
    assert bmm.threshold() == pytest.approx(0.3)  # one class: identical components, grid minimum
    bmm = BetaMixtureThreshold()
    bmm.fit(torch.full((50,), 0.5), torch.arange(50) % 2 == 0)
    assert bmm.threshold() == pytest.approx(0.9)  # zero variance: the fit blows up, grid maximum
    safe = BetaMixtureThreshold(repo_compat=False)
    safe.fit(torch.full((50,), 0.5), torch.ones(50, dtype=torch.bool))
    assert torch.isfinite(safe.alphas).all() and 0.3 <= safe.threshold() <= 0.9
    capped = BetaMixtureThreshold(max_fits=2)
    capped.add(torch.rand(20), torch.rand(20) > 0.5)
    for _ in range(4):
        capped.maybe_refit()
    assert capped.fits == 2


# --------------------------------------------------------------------------------------------------- errors
def test_bad_input_gets_clear_errors():
    model = make()
    x = prompts()
    with pytest.raises(ValueError, match="threshold must be in"):
        EarlyExitConfig("calm", threshold=1.5)
    with pytest.raises(ValueError, match="gamma"):
        EarlyExitConfig("self_speculative", exit_layer=1, gamma=0)
    with pytest.raises(ValueError, match="needs exit_layer"):
        EarlyExitConfig("static")
    with pytest.raises(ValueError, match="method must be"):
        EarlyExitConfig("medusa")
    plain = ModuleFormerForCausalLM(ModuleFormerConfig(**tiny_config_kwargs(n_layer=L))).eval()
    with pytest.raises(ValueError, match="has no exit head"):
        run(plain, x, EarlyExitConfig("static", exit_layer=2), 4)
    assert run(plain, x, EarlyExitConfig("static", exit_layer=2, shared_head=True), 4).sequences.shape == (2, 9)
    with pytest.raises(ValueError, match="out of range"):
        run(model, x, EarlyExitConfig("static", exit_layer=L + 1), 4)
    with pytest.raises(ValueError, match="exit_layer <"):
        run(model, x, EarlyExitConfig("self_speculative", exit_layer=L), 4)
    with pytest.raises(ValueError, match="max_new_tokens"):
        run(model, x, EarlyExitConfig("full"), 0)
    unknown = torch.nn.Module()
    unknown.transformer = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError, match="no backbone adapter for Module .*register_adapter"):
        LayerStack(unknown)
    gpt2 = make("gpt2")
    with pytest.raises(ValueError, match="position embeddings"):
        run(gpt2, x, EarlyExitConfig("static", exit_layer=1), 64)
    with pytest.raises(ValueError, match=r"input ids must be in \[0, 97\)"):
        run(gpt2, x + 100, EarlyExitConfig("static", exit_layer=1), 4)
    with pytest.raises(ValueError, match="eval"):
        run(model.train(), x, EarlyExitConfig("full"), 4)


@pytest.mark.parametrize("backbone", BACKBONES)
def test_generate_entry_point_with_early_exit(backbone):
    model = make(backbone, seed=5, scale=0.3)
    x, mask = padded_batch()
    ref = hf_greedy(model, x, 12, mask)
    cfg = EarlyExitConfig("self_speculative", exit_layer=2, gamma=3)
    out = model.generate(x, attention_mask=mask, early_exit=cfg, max_new_tokens=12, eos_token_id=[], pad_token_id=0)
    assert torch.equal(out, ref)
    full = model.generate(input_ids=x, attention_mask=mask, early_exit=EarlyExitConfig("full"), max_new_tokens=12,
                          eos_token_id=[], pad_token_id=0, return_dict_in_generate=True)
    assert torch.equal(full.sequences, ref) and full.stats["new_tokens"] == 12
    with pytest.raises(TypeError, match="num_beams"):
        model.generate(x, early_exit=cfg, num_beams=2)
