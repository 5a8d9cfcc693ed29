"""kernels.routing / kernels.expert_linear against an independent float64 per-(token, slot) loop."""
import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from moduleformer_exit.kernels.expert_linear import expert_linear
from moduleformer_exit.kernels.routing import RoutingPlan, plan_routing


# ------------------------------------------------------------------ naive float64 references (no sorting at all)


def ref_map(x, w, idx):
    """[N, in] tokens -> [N*k, out] pair rows, token-major: row t*k+j = x[t] @ w[idx[t, j]]."""
    n, k = idx.shape
    return torch.stack([x[t] @ w[idx[t, j]] for t in range(n) for j in range(k)])


def ref_pairs(xp, w, idx):
    """[N*k, in] pair rows (token-major) -> [N*k, out]: row p = xp[p] @ w[idx.flat[p]]."""
    flat = idx.reshape(-1)
    return torch.stack([xp[p] @ w[flat[p]] for p in range(flat.numel())])


def ref_reduce(xp, w, idx, g):
    """[N*k, in] pair rows -> [N, out]: y[t] = sum_j g[t, j] * xp[t*k+j] @ w[idx[t, j]]."""
    n, k = idx.shape
    return torch.stack([sum(g[t, j] * (xp[t * k + j] @ w[idx[t, j]]) for j in range(k)) for t in range(n)])


def ref_mlp(x, w1, w2, idx, g):
    """[N, D] -> [N, D]: y[t] = sum_j g[t, j] * gelu_tanh(x[t] @ w1[e]) @ w2[e], e = idx[t, j]."""
    n, k = idx.shape
    rows = []
    for t in range(n):
        rows.append(sum(g[t, j] * (F.gelu(x[t] @ w1[idx[t, j]], approximate="tanh") @ w2[idx[t, j]]) for j in range(k)))
    return torch.stack(rows)


# ------------------------------------------------------------------ helpers


def routing(n, k, e, kind="uniform", seed=0):
    gen = torch.Generator().manual_seed(seed)
    if kind == "uniform":  # distinct experts per token, random loads
        return torch.stack([torch.randperm(e, generator=gen)[:k] for _ in range(n)])
    if kind == "skewed":  # uneven loads; every other expert is empty (needs e >= 2k)
        probs = torch.zeros(e, dtype=torch.float64)
        probs[::2] = 0.5 ** torch.arange(len(probs[::2]), dtype=torch.float64)
        return torch.stack([torch.multinomial(probs, k, generator=gen) for _ in range(n)])
    if kind == "one":  # every token on one expert (k=1)
        return torch.full((n, k), e - 1, dtype=torch.long)
    raise ValueError(kind)


def leaf(*shape, scale=1.0, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(dtype).requires_grad_()


def grads(out, inputs, seed=1):
    """Backward with a fixed random cotangent; returns the grads of `inputs` (float64)."""
    gen = torch.Generator().manual_seed(seed)
    cot = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    gs = torch.autograd.grad(out, inputs, cot.to(out.dtype))
    return [g.double() for g in gs]


def close(a, b, tol=1e-5):
    a, b = a.double(), b.double()
    err = (a - b).abs().max().item()
    scale = max(b.abs().max().item(), 1e-3)
    assert err <= tol * scale, f"max abs err {err:.3e} vs scale {scale:.3e}"


def as64(*ts):
    return [t.detach().double().requires_grad_() for t in ts]


# dims: D and H multiples of 4 (grouped_mm path); (6, 10) exercise the fallback loop in fp32
CASES = [
    # n, k, e, d, h, routing kind
    (13, 2, 4, 8, 12, "uniform"),
    (17, 2, 8, 8, 12, "skewed"),  # uneven loads + empty experts
    (9, 1, 4, 8, 12, "uniform"),  # k = 1
    (7, 4, 4, 8, 12, "uniform"),  # k = E
    (1, 2, 5, 8, 12, "uniform"),  # N = 1 (most experts empty)
    (11, 1, 3, 8, 12, "one"),  # all tokens on one expert
    (10, 2, 4, 6, 10, "uniform"),  # unaligned dims -> loop fallback
]


@pytest.mark.parametrize("n,k,e,d,h,kind", CASES)
def test_map_scattered(n, k, e, d, h, kind):
    idx = routing(n, k, e, kind)
    plan = plan_routing(idx, e)
    x, w = leaf(n, d, seed=1), leaf(e, d, h, scale=0.3, seed=2)
    y = expert_linear(x, w, plan, fan_out=k)
    x64, w64 = as64(x, w)
    y64 = ref_map(x64, w64, idx)
    close(y, y64)
    for a, b in zip(grads(y, [x, w]), grads(y64, [x64, w64])):
        close(a, b)


@pytest.mark.parametrize("n,k,e,d,h,kind", CASES)
def test_map_grouped_out(n, k, e, d, h, kind):
    idx = routing(n, k, e, kind)
    plan = plan_routing(idx, e)
    x, w = leaf(n, d, seed=1), leaf(e, d, h, scale=0.3, seed=2)
    y = expert_linear(x, w, plan, fan_out=k, grouped_out=True)
    x64, w64 = as64(x, w)
    y64 = ref_map(x64, w64, idx)[plan.sorted_scattered_idxs]  # grouped order
    close(y, y64)
    for a, b in zip(grads(y, [x, w]), grads(y64, [x64, w64])):
        close(a, b)


@pytest.mark.parametrize("n,k,e,d,h,kind", CASES)
def test_reduce_with_gates(n, k, e, d, h, kind):
    idx = routing(n, k, e, kind)
    plan = plan_routing(idx, e)
    xp, w, g = leaf(n * k, h, seed=1), leaf(e, h, d, scale=0.3, seed=2), leaf(n, k, seed=3)
    y = expert_linear(xp, w, plan, fan_out=1, gates=g)
    assert y.shape == (n, d)
    xp64, w64, g64 = as64(xp, w, g)
    y64 = ref_reduce(xp64, w64, idx, g64)
    close(y, y64)
    for a, b in zip(grads(y, [xp, w, g]), grads(y64, [xp64, w64, g64])):
        close(a, b)


@pytest.mark.parametrize("n,k,e,d,h,kind", CASES)
def test_reduce_scattered_no_gates(n, k, e, d, h, kind):
    idx = routing(n, k, e, kind)
    plan = plan_routing(idx, e)
    xp, w = leaf(n * k, h, seed=1), leaf(e, h, d, scale=0.3, seed=2)
    y = expert_linear(xp, w, plan, fan_out=1)
    xp64, w64 = as64(xp, w)
    y64 = ref_pairs(xp64, w64, idx)
    close(y, y64)
    for a, b in zip(grads(y, [xp, w]), grads(y64, [xp64, w64])):
        close(a, b)


@pytest.mark.parametrize("n,k,e,d,h,kind", CASES)
def test_mlp_path(n, k, e, d, h, kind):
    """grouped_out -> act -> grouped_in with gates: ModuleFormer's expert MLP."""
    idx = routing(n, k, e, kind)
    plan = plan_routing(idx, e)
    x, w1, w2, g = leaf(n, d, seed=1), leaf(e, d, h, scale=0.3, seed=2), leaf(e, h, d, scale=0.3, seed=3), leaf(n, k, seed=4)
    hid = expert_linear(x, w1, plan, fan_out=k, grouped_out=True)
    y = expert_linear(F.gelu(hid, approximate="tanh"), w2, plan, fan_out=1, grouped_in=True, gates=g)
    x64, w164, w264, g64 = as64(x, w1, w2, g)
    y64 = ref_mlp(x64, w164, w264, idx, g64)
    close(y, y64)
    for a, b in zip(grads(y, [x, w1, w2, g]), grads(y64, [x64, w164, w264, g64])):
        close(a, b)


def test_float64_fallback_matches_reference():
    n, k, e, d, h = 9, 2, 4, 8, 12
    idx = routing(n, k, e)
    plan = plan_routing(idx, e)
    x, w, g = leaf(n * k, d, seed=1, dtype=torch.float64), leaf(e, d, h, seed=2, dtype=torch.float64), leaf(n, k, seed=3, dtype=torch.float64)
    y = expert_linear(x, w, plan, fan_out=1, gates=g)
    y64 = ref_reduce(x, w, idx, g)
    close(y, y64, tol=1e-12)
    for a, b in zip(grads(y, [x, w, g]), grads(y64, [x, w, g])):
        close(a, b, tol=1e-12)


def test_sum_backward_and_noncontiguous_inputs():
    """.sum().backward() hands zero-stride grads (grouped_mm's own backward rejects them); inputs are views."""
    n, k, e, d, h = 12, 2, 4, 8, 12
    idx = routing(n, k, e)
    plan = plan_routing(idx, e)
    xt = leaf(d, n, seed=1)  # x = xt.t(): non-contiguous
    w1t = leaf(e, h, d, scale=0.3, seed=2)  # weight = transposed view
    w2 = leaf(e, h, 2 * d, scale=0.3, seed=3)  # weight = strided slice of the last dim
    gt = leaf(k, n, seed=4)
    x, w1, g = xt.t(), w1t.transpose(1, 2), gt.t()
    assert not x.is_contiguous() and not w1.is_contiguous() and not g.is_contiguous()
    hid = expert_linear(x, w1, plan, fan_out=k, grouped_out=True)
    y = expert_linear(F.gelu(hid, approximate="tanh"), w2[:, :, ::2], plan, fan_out=1, grouped_in=True, gates=g)
    y.sum().backward()
    q = expert_linear(x, w1, plan, fan_out=k)
    q.sum().backward()  # scattered output, zero-stride grad

    x64, w164, w264, g64 = as64(x, w1, w2[:, :, ::2], g)
    y64 = ref_mlp(x64, w164, w264, idx, g64)
    q64 = ref_map(x64, w164, idx)
    (y64.sum() + q64.sum()).backward()
    close(y, y64)
    close(xt.grad.t(), x64.grad)
    close(w1t.grad.transpose(1, 2), w164.grad)
    close(w2.grad[:, :, ::2], w264.grad)
    assert w2.grad[:, :, 1::2].abs().max() == 0
    close(gt.grad.t(), g64.grad)


def test_gates_without_grad_and_frozen_weight():
    n, k, e, d, h = 8, 2, 4, 8, 12
    idx = routing(n, k, e)
    plan = plan_routing(idx, e)
    x = leaf(n * k, d, seed=1)
    w = leaf(e, d, h, seed=2).detach()
    g = leaf(n, k, seed=3).detach()
    y = expert_linear(x, w, plan, fan_out=1, gates=g)
    (dx,) = grads(y, [x])
    x64, w64, g64 = as64(x, w, g)
    (dx64,) = grads(ref_reduce(x64, w64, idx, g64), [x64])
    close(dx, dx64)


def test_bad_arguments():
    idx = routing(4, 2, 4)
    plan = plan_routing(idx, 4)
    x, w = torch.randn(4, 8), torch.randn(4, 8, 12)
    with pytest.raises(ValueError, match="valid choices"):
        expert_linear(x, w, plan, fan_out=2, backend="cuda-magic")
    with pytest.raises(RuntimeError, match="MegaBlocks"):  # GPU-only optional backend, not installable here
        expert_linear(x, w, plan, fan_out=2, backend="megablocks")
    with pytest.raises(ValueError):
        expert_linear(x, w, plan, fan_out=1)  # 4 rows but N*k = 8 pairs
    with pytest.raises(ValueError):
        expert_linear(x, torch.randn(3, 8, 12), plan, fan_out=2)  # wrong E
    with pytest.raises(ValueError):
        expert_linear(x, w, plan, fan_out=2, gates=torch.randn(4, 3))
    with pytest.raises(ValueError):
        plan_routing(torch.zeros(4, 5, dtype=torch.long), 4)  # k > E


# ------------------------------------------------------------------ routing plan


@pytest.mark.parametrize("n,k,e,kind", [(50, 2, 8, "uniform"), (31, 3, 16, "skewed"), (20, 1, 3, "one"), (1, 4, 4, "uniform")])
def test_plan_routing(n, k, e, kind):
    idx = routing(n, k, e, kind)
    plan = plan_routing(idx, e)
    assert isinstance(plan, RoutingPlan) and plan.num_experts == e and plan.top_k == k and plan.num_tokens == n
    flat = idx.reshape(-1)
    counts = torch.tensor([(flat == i).sum().item() for i in range(e)])
    assert torch.equal(plan.expert_counts, counts)
    assert torch.equal(plan.expert_offsets, counts.cumsum(0))
    assert torch.equal(plan.expert_offsets_i32, counts.cumsum(0).int())
    assert torch.equal(flat[plan.sorted_scattered_idxs], plan.sorted_expert_idxs)
    assert (plan.sorted_expert_idxs.diff() >= 0).all()
    # stable: within one expert, pair indices increase
    same = plan.sorted_expert_idxs[1:] == plan.sorted_expert_idxs[:-1]
    assert (plan.sorted_scattered_idxs.diff()[same] > 0).all()
    assert torch.equal(torch.sort(plan.sorted_scattered_idxs).values, torch.arange(n * k))
    assert torch.equal(plan.sorted_scattered_idxs[plan.scattered_to_sorted], torch.arange(n * k))
    assert torch.equal(plan.sorted_token_idxs, plan.sorted_scattered_idxs // k)
    for t in (plan.sorted_expert_idxs, plan.sorted_scattered_idxs, plan.expert_offsets):
        assert t.dtype == torch.int64


class _NoHostSync(TorchDispatchMode):
    """Fails on any op that reads a tensor value back to the host (.item(), .tolist(), bool(t), ...)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            raise AssertionError(f"host sync via {func}")
        return func(*args, **(kwargs or {}))


def _forbid(*args, **kwargs):
    raise AssertionError("host sync via a Tensor method")


def test_no_host_sync(monkeypatch):
    idx = routing(32, 2, 8, "skewed")
    with pytest.raises(AssertionError, match="host sync"):  # the guard works
        with _NoHostSync():
            torch.tensor([1, 2]).sum().item()
    # .tolist()/.numpy() read memory directly (no aten op), so patch them too
    for name in ("tolist", "numpy", "item", "cpu"):
        monkeypatch.setattr(torch.Tensor, name, _forbid)
    with _NoHostSync():
        plan = plan_routing(idx, 8)
    # grouped-GEMM path (fp32, aligned dims), forward and backward, is sync-free too (the loop fallback is not)
    x, w1, w2, g = leaf(32, 8, seed=1), leaf(8, 8, 12, seed=2), leaf(8, 12, 8, seed=3), leaf(32, 2, seed=4)
    cot = torch.randn(32, 8)
    with _NoHostSync():
        hid = expert_linear(x, w1, plan, fan_out=2, grouped_out=True)
        y = expert_linear(F.gelu(hid, approximate="tanh"), w2, plan, fan_out=1, grouped_in=True, gates=g)
        y.backward(cot)
        expert_linear(x, w1, plan, fan_out=2).sum().backward()


def test_bfloat16_grouped_mm():
    n, k, e, d, h = 16, 2, 4, 16, 24
    idx = routing(n, k, e)
    plan = plan_routing(idx, e)
    x, w, g = leaf(n * k, d, seed=1, dtype=torch.bfloat16), leaf(e, d, h, scale=0.3, seed=2, dtype=torch.bfloat16), leaf(n, k, seed=3, dtype=torch.bfloat16)
    y = expert_linear(x, w, plan, fan_out=1, gates=g)
    assert y.dtype == torch.bfloat16
    x64, w64, g64 = as64(x, w, g)
    y64 = ref_reduce(x64, w64, idx, g64)
    close(y, y64, tol=3e-2)
    for a, b in zip(grads(y, [x, w, g]), grads(y64, [x64, w64, g64])):
        close(a, b, tol=3e-2)
