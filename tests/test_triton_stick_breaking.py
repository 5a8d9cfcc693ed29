"""Triton stick-breaking kernels (run on CPU through the Triton interpreter) vs a float64 reference."""
import pytest
import torch

from moduleformer_exit.kernels import stick_breaking_attention
from moduleformer_exit.kernels.backend import resolve_backend, triton_available, triton_interpret

pytestmark = pytest.mark.skipif(
    not triton_available() or (not torch.cuda.is_available() and not triton_interpret()),
    reason="needs triton (CUDA, or TRITON_INTERPRET=1 on CPU)",
)

from test_stick_breaking import left_pad_mask, rand_inputs, ref_attention  # noqa: E402  (float64 reference)

DEV = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


def _sb(*args, **kwargs):
    from moduleformer_exit.kernels.triton_stick_breaking import triton_stick_breaking_attention

    return triton_stick_breaking_attention(*args, **kwargs)


def _check(shape, mask_kind, dtype, atol_fwd, atol_grad, seed=0):
    B, T, S, K, H, D, bm, bn = shape
    q, k, v = (x.to(DEV) for x in rand_inputs(B, T, S, K, H, D, dtype=dtype, seed=seed + T + S))
    mask = None
    if mask_kind == "leftpad":
        mask = left_pad_mask(B, S, [min(3, S - 1), S // 2][:B]).to(DEV)
    elif mask_kind == "holes":
        mask = left_pad_mask(B, S, [2] * B).to(DEV)
        mask[:, S // 2] = 0
        mask[:, S - 1] = 0  # the newest key masked too
    q.requires_grad_(), k.requires_grad_(), v.requires_grad_()
    out = _sb(q, k, v, mask, block_m=bm, block_n=bn)
    assert out.shape == q.shape and out.dtype == dtype
    qd, kd, vd = (x.detach().cpu().double().requires_grad_() for x in (q, k, v))
    ref = ref_attention(qd, kd, vd, None if mask is None else mask.cpu())
    torch.testing.assert_close(out.detach().cpu().double(), ref, atol=atol_fwd, rtol=atol_fwd)
    grad = torch.randn_like(ref)
    got = torch.autograd.grad(out, (q, k, v), grad.to(dtype).to(DEV))
    want = torch.autograd.grad(ref, (qd, kd, vd), grad)
    for name, a, b in zip("qkv", got, want):
        assert a.dtype == dtype
        torch.testing.assert_close(a.cpu().double(), b, atol=atol_grad, rtol=atol_grad, msg=f"d{name}")


SHAPES = [
    # B, T,  S,  K, H, D, block_m, block_n
    (2, 37, 37, 2, 1, 16, 16, 16),  # T*K = 74: several row blocks, last one partial; carries across key blocks
    (1, 29, 50, 3, 1, 16, 32, 16),  # KV-cache offset 21, K = 3 (a row block spans positions unevenly)
    (2, 1, 45, 2, 1, 16, 16, 16),  # decode: one query position over 45 keys
    (1, 20, 20, 1, 2, 16, 16, 32),  # K = 1, two heads, key block larger than the row block
    (1, 18, 24, 2, 1, 12, 16, 16),  # head dim 12 (padded to 16 in the kernel)
]
_IDS = ["B{}T{}S{}K{}H{}D{}m{}n{}".format(*s) for s in SHAPES]


@pytest.mark.parametrize("shape", SHAPES, ids=_IDS)
def test_fp32_matches_reference(shape):
    _check(shape, "leftpad" if shape[1] != 20 else "holes", torch.float32, 1e-5, 1e-4)


@pytest.mark.parametrize("shape", [SHAPES[0], SHAPES[1]], ids=_IDS[:2])
def test_fp32_no_mask(shape):
    _check(shape, None, torch.float32, 1e-5, 1e-4, seed=1)


@pytest.mark.parametrize("shape", [SHAPES[1], SHAPES[2]], ids=_IDS[1:3])
def test_fp64_matches_reference_tightly(shape):
    _check(shape, "holes", torch.float64, 1e-12, 1e-11)


def test_fully_masked_rows_are_zero_with_finite_grads():
    q, k, v = (x.to(DEV) for x in rand_inputs(2, 12, 12, 2, 1, 16))
    mask = left_pad_mask(2, 12, [0, 12]).to(DEV)  # batch 1: nothing visible
    mask[0, :5] = 0  # batch 0: rows 0..4 see only masked keys
    q.requires_grad_(), k.requires_grad_(), v.requires_grad_()
    out = _sb(q, k, v, mask, block_m=16, block_n=16)
    assert torch.isfinite(out).all()
    assert (out[1] == 0).all() and (out[0, :5] == 0).all()
    out.sum().backward()
    assert all(torch.isfinite(x.grad).all() for x in (q, k, v))
    assert (q.grad[1] == 0).all() and (k.grad[1] == 0).all() and (v.grad[1] == 0).all()
    torch.testing.assert_close(out.detach().cpu().double(), ref_attention(q.detach().cpu(), k.detach().cpu(),
                                                                          v.detach().cpu(), mask.cpu()),
                               atol=1e-5, rtol=1e-5)


def test_backward_is_deterministic():
    q, k, v = (x.to(DEV) for x in rand_inputs(1, 24, 30, 2, 1, 16, seed=3))
    mask = left_pad_mask(1, 30, [4]).to(DEV)
    grad = torch.randn(q.shape, device=DEV)
    runs = []
    for _ in range(2):
        qs, ks, vs = (x.clone().requires_grad_() for x in (q, k, v))
        out = _sb(qs, ks, vs, mask, block_m=16, block_n=16)
        runs.append((out,) + torch.autograd.grad(out, (qs, ks, vs), grad))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_large_logits_and_non_contiguous_inputs():
    q, k, v = rand_inputs(1, 20, 20, 2, 1, 16, q_scale=10.0)  # logits up to ~100: softplus shortcuts
    q = torch.cat([q, q], -1)[..., ::2].to(DEV)  # strided q (last-dim stride 2)
    k = k.transpose(1, 2).contiguous().transpose(1, 2).to(DEV)  # non-standard strides
    v = v.to(DEV)
    q.requires_grad_(), k.requires_grad_(), v.requires_grad_()
    out = _sb(q, k, v, block_m=16, block_n=16)
    qd, kd, vd = (x.detach().cpu().double().requires_grad_() for x in (q, k, v))
    ref = ref_attention(qd, kd, vd)
    torch.testing.assert_close(out.detach().cpu().double(), ref, atol=1e-5, rtol=1e-5)
    grad = torch.randn_like(ref)
    grad_nc = torch.stack([grad, grad], -1).float().to(DEV)[..., 0]  # non-contiguous view of grad
    got = torch.autograd.grad(out, (q, k, v), grad_nc)
    want = torch.autograd.grad(ref, (qd, kd, vd), grad)
    for a, b in zip(got, want):
        torch.testing.assert_close(a.cpu().double(), b, atol=1e-4, rtol=1e-4)


def test_bf16_close_to_reference():
    q, k, v = (x.bfloat16().to(DEV) for x in rand_inputs(1, 20, 20, 2, 1, 16))
    q.requires_grad_(), k.requires_grad_(), v.requires_grad_()
    out = _sb(q, k, v, block_m=16, block_n=16)
    assert out.dtype == torch.bfloat16
    qd, kd, vd = (x.detach().cpu().double().requires_grad_() for x in (q, k, v))
    ref = ref_attention(qd, kd, vd)
    torch.testing.assert_close(out.cpu().double(), ref, atol=2e-2, rtol=2e-2)
    grad = torch.randn_like(ref)
    got = torch.autograd.grad(out, (q, k, v), grad.bfloat16().to(DEV))
    want = torch.autograd.grad(ref, (qd, kd, vd), grad)
    for a, b in zip(got, want):
        assert a.dtype == torch.bfloat16
        torch.testing.assert_close(a.cpu().double(), b, atol=5e-2, rtol=5e-2)


def test_dispatch_backends():
    q, k, v = (x.to(DEV) for x in rand_inputs(1, 9, 12, 2, 1, 16))
    mask = left_pad_mask(1, 12, [2]).to(DEV)
    tri = stick_breaking_attention(q, k, v, mask, backend="triton")
    tor = stick_breaking_attention(q, k, v, mask, backend="torch")
    torch.testing.assert_close(tri, tor, atol=1e-5, rtol=1e-5)
    # "megablocks" is MLP-only: attention follows "auto" (torch on CPU, triton on CUDA)
    mb = stick_breaking_attention(q, k, v, mask, backend="megablocks")
    expect = tri if resolve_backend("auto", q) == "triton" else tor
    torch.testing.assert_close(mb, expect, atol=0, rtol=0)
    with pytest.raises(ValueError):
        stick_breaking_attention(q, k, v, backend="nope")


def test_model_triton_vs_torch(monkeypatch):
    """Full tiny ModuleFormer: kernel_backend='triton' == 'torch' (logits, every parameter gradient, and a
    one-token decode step over the KV cache)."""
    from conftest import tiny_config_kwargs

    from moduleformer_exit import ModuleFormerConfig, ModuleFormerForCausalLM
    from moduleformer_exit.kernels import triton_stick_breaking as tsb

    calls = []
    real = tsb.triton_stick_breaking_attention
    monkeypatch.setattr(tsb, "triton_stick_breaking_attention",
                        lambda q, *a, **kw: calls.append(tuple(q.shape)) or real(q, *a, **kw))

    ids = torch.randint(3, 97, (2, 11), generator=torch.Generator().manual_seed(0)).to(DEV)
    attn = torch.ones(2, 11, dtype=torch.long, device=DEV)
    attn[1, :4] = 0  # left padding
    results = {}
    for backend in ("torch", "triton"):
        torch.manual_seed(0)
        model = ModuleFormerForCausalLM(ModuleFormerConfig(**tiny_config_kwargs(kernel_backend=backend))).to(DEV)
        model.eval()  # no dropout / sampling noise
        out = model(input_ids=ids, attention_mask=attn, labels=ids)
        out.loss.backward()
        with torch.no_grad():  # decode one token over the cache (T=1, S=12)
            step = model(input_ids=ids[:, -1:], attention_mask=torch.cat([attn, attn[:, -1:]], 1),
                         past_key_values=model(input_ids=ids, attention_mask=attn, use_cache=True).past_key_values)
        results[backend] = (out.logits.detach(), {n: p.grad for n, p in model.named_parameters()
                                                   if p.grad is not None}, step.logits)
    assert len(calls) >= 3 * 2 and (2, 1, 2, 2, 8) in calls  # every layer went through the kernel, decode too
    (lt, gt, st), (lr, gr, sr) = results["torch"], results["triton"]
    torch.testing.assert_close(lr, lt, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sr, st, atol=1e-5, rtol=1e-5)
    assert gt.keys() == gr.keys() and len(gt) > 0
    for name in gt:
        torch.testing.assert_close(gr[name], gt[name], atol=1e-5, rtol=1e-4, msg=name)


def test_cuda_benchmark_imports_without_gpu():
    from moduleformer_exit.benchmarks.attention_cuda import bench_stick_breaking_cuda

    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError):
            bench_stick_breaking_cuda(seq_lens=(64,))
