"""The block decode step (moduleformer_exit.decode_step) against the modules' general path.

The general path is the modules' own forward (routers, MoE map/reduce, the stick-breaking dispatcher): an
independent implementation of the same block, itself tested against IBM's code and float64 references. The step
must give its outputs at every decode step (fp32 to 1e-6, float64 to 1e-12), be taken where it should, and step
aside wherever its shortcut would compute something else (hooks, wrapped or replaced modules, training,
gradients, attention weights, gmm gates, more than FEW_TOKENS tokens).
"""
import pytest
import torch
from torch import nn

import moduleformer_exit.modeling as modeling


@pytest.fixture
def steps(monkeypatch):
    """``steps.n``: block_decode_step calls so far; ``steps.general()``: switch the step off (the modules' path)."""
    calls = []
    real = modeling.block_decode_step
    monkeypatch.setattr(modeling, "block_decode_step", lambda *a: calls.append(1) or real(*a))
    real_applies = modeling.decode_step_applies

    class Steps:
        n = property(lambda self: len(calls))

        @staticmethod
        def general():
            monkeypatch.setattr(modeling, "decode_step_applies", lambda *a: False)

        @staticmethod
        def fast():
            monkeypatch.setattr(modeling, "decode_step_applies", real_applies)

    return Steps()


def _generate(model, prompt, mask=None, new=6):
    with torch.no_grad():
        out = model.generate(prompt, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                             pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    return out.sequences, torch.stack(out.logits)


def _assert_general_path_agrees(model, prompt, fast, steps):
    """``fast`` = (sequences, logits) of a run; the modules' path must give the same."""
    steps.general()
    seq_gen, logits_gen = _generate(model, prompt)
    assert torch.equal(fast[0], seq_gen)
    torch.testing.assert_close(fast[1], logits_gen, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("gate_type", ["mlp", "linear"])
@pytest.mark.parametrize("padded", [False, True])
def test_greedy_decode_equals_general_path(tiny_model, steps, gate_type, padded):
    model = tiny_model(seed=1, gate_type=gate_type)
    torch.manual_seed(2)
    if padded:  # two rows, the second left-padded: the mask reaches the step (B*T = 2)
        prompt = torch.randint(3, 97, (2, 7))
        prompt[1, :3] = 0
        mask = torch.ones_like(prompt)
        mask[1, :3] = 0
    else:
        prompt, mask = torch.randint(3, 97, (1, 5)), None
    seq_fast, logits_fast = _generate(model, prompt, mask)
    assert steps.n == 5 * model.config.n_layer  # every decode step after the prefill, every block
    steps.general()
    seq_gen, logits_gen = _generate(model, prompt, mask)
    assert steps.n == 5 * model.config.n_layer
    assert torch.equal(seq_fast, seq_gen)
    torch.testing.assert_close(logits_fast, logits_gen, atol=1e-6, rtol=1e-6)


def _cached_forward(model, prompt, new_tokens, mask=None):
    """Prefill ``prompt`` then one forward of ``new_tokens`` [B, T] on the cache: (logits, every hidden state,
    every layer's cached keys and values)."""
    with torch.no_grad():
        out = model(prompt, attention_mask=None if mask is None else mask[:, :prompt.shape[1]], use_cache=True)
        cache = out.cache if getattr(out, "cache", None) is not None else out.past_key_values
        step = model(new_tokens, attention_mask=mask, cache=cache, use_cache=True, output_hidden_states=True)
    kv = [t for layer in cache.layers for t in (layer.keys, layer.values)]
    return [step.logits, *step.hidden_states] + kv


@pytest.mark.parametrize("batch,length", [(1, 1), (1, 3), (2, 2), (4, 1)])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.float64, 1e-12)])
def test_few_new_tokens_on_a_cache_equal_general_path(tiny_model, steps, batch, length, dtype, tol):
    """T > 1 new tokens (causal among themselves, as in speculative verification) and masked rows."""
    model = tiny_model(seed=3).to(dtype)
    torch.manual_seed(4)
    prompt = torch.randint(3, 97, (batch, 6))
    new = torch.randint(3, 97, (batch, length))
    mask = torch.ones(batch, 6 + length, dtype=torch.long)
    mask[-1, :2] = 0  # the last row left-padded by two
    fast = _cached_forward(model, prompt, new, mask)
    assert steps.n == model.config.n_layer
    steps.general()
    general = _cached_forward(model, prompt, new, mask)
    for got, want in zip(fast, general):
        torch.testing.assert_close(got, want, atol=tol, rtol=tol)


def test_without_cache_and_with_identity_kv(tiny_model, steps):
    """No cache (a short prompt's own forward) and the k/v Identity variant (att_hidden == n_embd, one head)."""
    model = tiny_model(seed=5, n_head=1, att_hidden=32)
    assert isinstance(model.transformer.h[0].attn.k_proj, nn.Identity)
    ids = torch.randint(3, 97, (1, 4))
    with torch.no_grad():
        fast = model(ids, use_cache=False).logits
        assert steps.n == model.config.n_layer
        steps.general()
        general = model(ids, use_cache=False).logits
    torch.testing.assert_close(fast, general, atol=1e-6, rtol=1e-6)


def test_bfloat16_equals_general_path(tiny_model, steps):
    model = tiny_model(seed=6).to(torch.bfloat16)
    prompt = torch.randint(3, 97, (1, 5))
    new = torch.randint(3, 97, (1, 1))
    fast = _cached_forward(model, prompt, new)
    steps.general()
    general = _cached_forward(model, prompt, new)
    for got, want in zip(fast, general):
        torch.testing.assert_close(got, want, atol=1e-2, rtol=1e-2)


def test_mask_not_covering_the_context_is_refused_as_by_the_general_path(tiny_model, steps):
    block = tiny_model(seed=7).transformer.h[0]
    x, wrong = torch.randn(1, 1, 32), torch.ones(1, 3)  # one position attended, a mask of three
    messages = []
    for _ in range(2):
        with torch.no_grad(), pytest.raises(ValueError, match=r"\[batch, past \+ new\] mask") as err:
            block(x, wrong, None, False, False)
        messages.append(str(err.value))
        if not messages[1:]:
            assert steps.n == 1  # the step refused it
            steps.general()
    assert messages[0] == messages[1]


class _LoraLikeLinear(nn.Linear):
    """A wrapped linear (as PEFT's LoRA layers are): its forward adds a delta the plain weights do not have."""

    def forward(self, x):
        return super().forward(x) + 0.5


def _hook_on_gate(model):
    seen = []
    model.transformer.h[0].mlpf.gate.w_gate[0].register_forward_hook(lambda *a: seen.append(1))
    return seen


def _wrap_k_proj(model):
    old = model.transformer.h[1].attn.k_proj
    new = _LoraLikeLinear(old.in_features, old.out_features).eval()  # eval: the class alone must make it step aside
    new.load_state_dict(old.state_dict())
    model.transformer.h[1].attn.k_proj = new


def _override_forward(model):  # as accelerate's offloading hooks do: an instance-level forward
    norm = model.transformer.h[0].ln_1
    norm.forward = lambda x, _f=norm.forward: _f(x) * 2.0


ASIDE = {
    "hook on a router layer": (_hook_on_gate, {}),
    "pre-hook on the attention": (lambda m: m.transformer.h[1].attn.register_forward_pre_hook(lambda *a: None), {}),
    "wrapped k_proj (PEFT-like)": (_wrap_k_proj, {}),
    "instance forward override": (_override_forward, {}),
    "global forward hook": (None, {}),
    "gmm gates": (None, {"gate_type": "gmm"}),
}


@pytest.mark.parametrize("case", sorted(ASIDE))
def test_steps_aside_where_the_shortcut_would_differ(tiny_model, steps, case):
    setup, overrides = ASIDE[case]
    model = tiny_model(seed=8, **overrides)
    prompt = torch.randint(3, 97, (1, 5))
    handle = None
    seen = None
    if case == "global forward hook":
        handle = nn.modules.module.register_module_forward_hook(lambda *a: None)
    elif setup is not None:
        seen = setup(model)
    try:
        seq_fast, logits_fast = _generate(model, prompt)
        steps_taken = steps.n
        steps.general()
        seq_gen, logits_gen = _generate(model, prompt)
    finally:
        if handle is not None:
            handle.remove()
    if case in ("hook on a router layer", "wrapped k_proj (PEFT-like)", "instance forward override",
                "pre-hook on the attention"):
        # only the block holding the odd module steps aside; the others still take the step
        assert steps_taken == 5 * (model.config.n_layer - 1)
    else:
        assert steps_taken == 0
    if isinstance(seen, list):
        assert len(seen) == 2 * 6  # called on the prefill, decode steps, both runs
    assert torch.equal(seq_fast, seq_gen)
    torch.testing.assert_close(logits_fast, logits_gen, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("mode", ["training", "grad enabled", "attention weights", "router logits", "too many"])
def test_not_taken_outside_plain_inference(tiny_model, steps, mode):
    model = tiny_model(seed=10)
    ids = torch.randint(3, 97, (2 if mode == "too many" else 1, 3))
    kwargs = {"attention weights": {"output_attentions": True}, "router logits": {"output_router_logits": True}}
    if mode == "training":
        model.train()
    if mode == "grad enabled":
        model(ids)
    else:
        with torch.no_grad():
            model(ids, **kwargs.get(mode, {}))
    assert steps.n == 0


def test_head_major_stick_breaking_matches_the_explicit_weights():
    """The step's attention against the explicit float64 weights (the definition, computed independently)."""
    from moduleformer_exit.attention import stick_breaking_weights
    from moduleformer_exit.kernels.torch_stick_breaking import head_major_stick_breaking

    torch.manual_seed(11)
    B, T, K, H, D, S = 2, 3, 2, 4, 8, 9
    q = torch.randn(B, T, K, H, D, dtype=torch.float64)
    k, v = torch.randn(B, S, H, D, dtype=torch.float64), torch.randn(B, S, H, D, dtype=torch.float64)
    mask = torch.ones(B, S)
    mask[1, :3] = 0
    weights = stick_breaking_weights(q, k, mask)  # [B, K, H, T, S]
    want = torch.einsum("bkhts,bshd->bhtkd", weights, v).reshape(B, H, T * K, D)
    qh = q.permute(0, 3, 1, 2, 4).reshape(B, H, T * K, D)
    got = head_major_stick_breaking(qh, k.transpose(1, 2), v.transpose(1, 2), mask, T, D ** -0.5)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("change", ["wrapped k_proj (PEFT-like)", "hook on a router layer"])
def test_a_change_after_the_first_step_is_noticed(tiny_model, steps, change):
    """The structural verdict is cached per block: a module replaced later (PEFT injecting adapters) is noticed,
    and hooks registered later are seen on every call."""
    model = tiny_model(seed=12)
    prompt = torch.randint(3, 97, (1, 5))
    _generate(model, prompt, new=2)
    assert steps.n == model.config.n_layer
    seen = _wrap_k_proj(model) if change.startswith("wrapped") else _hook_on_gate(model)
    fast = _generate(model, prompt)
    if seen is not None:
        assert len(seen) == 6  # prefill + 5 decode steps: block 0 stepped aside every time
    assert steps.n == model.config.n_layer + 5 * (model.config.n_layer - 1)
    _assert_general_path_agrees(model, prompt, fast, steps)


def test_the_switch_turns_the_step_off(tiny_model, steps, monkeypatch):
    from moduleformer_exit import decode_step

    model = tiny_model(seed=13)
    monkeypatch.setattr(decode_step, "ENABLED", False)
    _generate(model, torch.randint(3, 97, (1, 5)), new=3)
    assert steps.n == 0


def test_output_capture_leaves_the_step_on(tiny_model, steps):
    """transformers keeps its output recorders' hooks once installed: they sit on the blocks only (attention weights
    included), so asking for hidden states once does not switch the step off for later decoding."""
    model = tiny_model(seed=14)
    with torch.no_grad():
        model(torch.randint(3, 97, (1, 6)), output_hidden_states=True, output_attentions=True,
              output_router_logits=True)
    _generate(model, torch.randint(3, 97, (1, 5)))
    assert steps.n == 5 * model.config.n_layer


def test_exit_head_decoding_takes_the_step(steps):
    """Multi-exit decoding reads hidden states at every step (the exits' inputs): the step still applies."""
    from conftest import tiny_config_kwargs
    from moduleformer_exit import ModuleFormerConfig
    from moduleformer_exit.multi_exit_config import MultiExitConfiguration
    from moduleformer_exit.multi_exit_models import AutoMultiExitModel

    torch.manual_seed(15)
    config = ModuleFormerConfig(**tiny_config_kwargs(n_layer=4))
    model = AutoMultiExitModel.from_config(config, MultiExitConfiguration(
        lm_head_layer_indices=(2, 4), output_layer_index=2, use_original_head=False)).eval()
    prompt = torch.randint(3, 97, (1, 5))
    seq_fast, logits_fast = _generate(model, prompt)
    assert steps.n == 5 * 4
    steps.general()
    seq_gen, logits_gen = _generate(model, prompt)
    torch.testing.assert_close(logits_fast, logits_gen, atol=1e-6, rtol=1e-6)


class _Wrapper(nn.Module):
    """A module wrapped with other children (as PEFT's ``modules_to_save`` wraps one): no ``experts`` child."""

    def __init__(self, inner):
        super().__init__()
        self.original_module = inner

    def forward(self, *args, **kwargs):
        return self.original_module(*args, **kwargs)


def test_wrapped_expert_layer_steps_aside_without_error(tiny_model, steps):
    model = tiny_model(seed=16)
    model.transformer.h[0].mlpf = _Wrapper(model.transformer.h[0].mlpf).eval()
    prompt = torch.randint(3, 97, (1, 5))
    seq_fast, logits_fast = _generate(model, prompt)
    assert steps.n == 5 * (model.config.n_layer - 1)
    steps.general()
    seq_gen, logits_gen = _generate(model, prompt)
    torch.testing.assert_close(logits_fast, logits_gen, atol=1e-6, rtol=1e-6)


def test_step_resumes_after_a_hook_is_removed_or_a_wrapper_undone(tiny_model, steps):
    model = tiny_model(seed=17)
    prompt = torch.randint(3, 97, (1, 5))
    handle = model.transformer.h[0].ln_1.register_forward_hook(lambda *a: None)
    _generate(model, prompt)
    assert steps.n == 5 * (model.config.n_layer - 1)
    handle.remove()
    _generate(model, prompt)
    assert steps.n == 5 * (model.config.n_layer - 1) + 5 * model.config.n_layer
    wrapped = model.transformer.h[1].mlpf
    model.transformer.h[1].mlpf = _Wrapper(wrapped).eval()
    _generate(model, prompt)
    model.transformer.h[1].mlpf = wrapped  # e.g. merge_and_unload
    before = steps.n
    _generate(model, prompt)
    assert steps.n - before == 5 * model.config.n_layer


def test_blocks_are_freed_with_their_model(tiny_model, steps):
    import gc
    import weakref

    model = tiny_model(seed=18)
    _generate(model, torch.randint(3, 97, (1, 5)), new=2)
    assert steps.n > 0
    block = weakref.ref(model.transformer.h[0])
    del model
    gc.collect()
    assert block() is None


def test_a_router_dropout_left_in_train_mode_runs_its_forward(tiny_model, steps):
    """MC-dropout style: the block in eval, one router's dropout in train mode; the modules' path applies it."""
    model = tiny_model(seed=19, moe_pdrop=0.5)
    model.transformer.h[1].mlpf.gate.w_gate[2].train()
    prompt = torch.randint(3, 97, (1, 5))
    torch.manual_seed(0)
    seq_fast, logits_fast = _generate(model, prompt)
    assert steps.n == 5 * (model.config.n_layer - 1)
    steps.general()
    torch.manual_seed(0)
    seq_gen, logits_gen = _generate(model, prompt)
    torch.testing.assert_close(logits_fast, logits_gen, atol=1e-6, rtol=1e-6)
