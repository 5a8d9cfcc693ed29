"""Few-token (decode) expert path and once-per-module kernel resolution.

References: a float64 per-(token, slot) loop written from the definition, and the general routing-plan path
(``kernels.expert_linear``) the fast path must reproduce to 1e-6 in fp32.
"""
import importlib

import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_config_kwargs
from moduleformer_exit import ModuleFormerConfig, ModuleFormerForCausalLM
from moduleformer_exit.kernels import few_token_experts as fte
from moduleformer_exit.moe import MoE

# the modules, not the same-named functions the package re-exports
el_mod = importlib.import_module("moduleformer_exit.kernels.expert_linear")
sb_mod = importlib.import_module("moduleformer_exit.kernels.stick_breaking")


def _ref_map(x, w, idx):
    """float64 loop: y[t, j] = x[t] @ w[idx[t, j]]."""
    n, k = idx.shape
    y = torch.zeros(n, k, w.shape[2], dtype=torch.float64)
    for t in range(n):
        for j in range(k):
            y[t, j] = x[t].double() @ w[int(idx[t, j])].double()
    return y


def _ref_reduce(h, w, idx, g):
    n, k = idx.shape
    y = torch.zeros(n, w.shape[2], dtype=torch.float64)
    for t in range(n):
        for j in range(k):
            y[t] += g[t, j].double() * (h[t, j].double() @ w[int(idx[t, j])].double())
    return y


@pytest.mark.parametrize("host_loop", [True, False])
@pytest.mark.parametrize("n,k", [(1, 1), (1, 2), (3, 2), (4, 3)])
def test_few_token_map_reduce_match_float64_loop(monkeypatch, host_loop, n, k):
    monkeypatch.setattr(fte, "_host_loop", lambda x: host_loop)  # False: the gather + bmm path (CUDA / tracing)
    g = torch.Generator().manual_seed(n * 10 + k)
    e, d_in, d_out = 5, 12, 20
    x = torch.randn(n, d_in, generator=g)
    w = torch.randn(e, d_in, d_out, generator=g)
    idx = torch.rand(n, e, generator=g).topk(k, dim=1).indices
    gates = torch.rand(n, k, generator=g)
    torch.testing.assert_close(fte.few_token_map(x, w, idx).double(), _ref_map(x, w, idx), atol=1e-5, rtol=1e-5)
    h = torch.randn(n, k, d_in, generator=g)
    torch.testing.assert_close(fte.few_token_reduce(h, w, idx, gates).double(), _ref_reduce(h, w, idx, gates),
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("n", [1, 2, 4])
def test_moe_few_token_path_equals_general_path(n, bias):
    torch.manual_seed(n)
    moe = MoE(16, 24, num_experts=6, top_k=2, bias=bias, activation=F.gelu, gating_size=8).eval()
    x = torch.randn(1, n, 16)
    with torch.no_grad():  # no gradient needed: few-token path
        assert moe._few_tokens(x.reshape(-1, 16))
        y_fast, _ = moe(x, compute_aux=False)
        q_fast, _, routing, plan = moe.map(x, compute_aux=False)
        assert plan is None
        r_fast = moe.reduce(q_fast, routing, plan)
    x_g = x.clone().requires_grad_()  # gradient needed: general routing-plan path
    assert not moe._few_tokens(x_g.reshape(-1, 16))
    y_gen, _ = moe(x_g, compute_aux=False)
    q_gen, _, routing_g, plan_g = moe.map(x_g, compute_aux=False)
    assert plan_g is not None
    r_gen = moe.reduce(q_gen, routing_g, plan_g)
    torch.testing.assert_close(y_fast, y_gen.detach(), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(q_fast, q_gen.detach(), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(r_fast, r_gen.detach(), atol=1e-6, rtol=1e-6)


def test_greedy_decode_fast_path_equals_general_path(monkeypatch):
    """Whole model, cached greedy decode: the few-token path gives the general path's logits at every step."""
    torch.manual_seed(0)
    model = ModuleFormerForCausalLM(ModuleFormerConfig(**tiny_config_kwargs())).eval()
    prompt = torch.randint(3, 97, (1, 5))

    def run():
        with torch.no_grad():
            out = model.generate(prompt, max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0,
                                 output_logits=True, return_dict_in_generate=True)
        return out.sequences, torch.stack(out.logits)

    import moduleformer_exit.modeling as modeling_mod
    import moduleformer_exit.moe as moe_mod

    # the modules' own path (the block decode step has its own tests: test_decode_step.py)
    monkeypatch.setattr(modeling_mod, "decode_step_applies", lambda *a: False)
    seq_fast, logits_fast = run()

    monkeypatch.setattr(moe_mod, "FEW_TOKENS", 0)  # every call takes the general path
    seq_gen, logits_gen = run()
    assert torch.equal(seq_fast, seq_gen)
    torch.testing.assert_close(logits_fast, logits_gen, atol=1e-6, rtol=1e-6)


def test_kernels_resolved_once_per_module_and_device(monkeypatch):
    calls = []
    for mod in (el_mod, sb_mod):
        real = mod.resolve_backend
        monkeypatch.setattr(mod, "resolve_backend", lambda *a, _real=real: calls.append(a[0]) or _real(*a))
    torch.manual_seed(0)
    config = ModuleFormerConfig(**tiny_config_kwargs())
    model = ModuleFormerForCausalLM(config).eval()
    ids = torch.randint(3, 97, (2, 9))
    model(ids)  # every module resolves its kernels here
    first = len(calls)
    # per layer: the MoA query experts, the MLP experts, the stick-breaking attention
    assert first == 3 * config.n_layer
    model(ids)
    with torch.no_grad():
        model.generate(ids[:1], max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert len(calls) == first  # no resolution on later forwards or decode steps
    model.transformer.h[0].mlpf.kernel_backend = "torch"  # changing the backend re-resolves that module only
    model(ids)
    assert len(calls) == first + 1
