"""kernels.stick_breaking against an independent float64 reference written from the definition."""
import math

import pytest
import torch

from moduleformer_exit.kernels import torch_stick_breaking as sbmod
from moduleformer_exit.kernels.stick_breaking import stick_breaking_attention


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny shapes gain nothing from intra-op threads, and on a loaded 2-core box the idle OpenMP worker's
    spin-waits make every small op slow; restore the suite's setting afterwards."""
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


# ------------------------------------------------------------------ float64 reference (linear space, no logs)


def ref_attention(q, k, v, mask=None, scale=None):
    """Direct definition, one query row at a time, in float64.

    q [B,T,K,H,D], k/v [B,S,H,D], mask [B,S] 0/1. Row r is absolute position p = S-T+r and sees keys 0..p;
    A_j = z_j * prod_{j<m<=p} (1 - z_m) with z = sigmoid(scale q.k), z = 0 for masked keys.
    """
    B, T, K, H, D = q.shape
    S = k.shape[1]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    q, k, v = q.double(), k.double(), v.double()
    keep = torch.ones(B, S, dtype=torch.float64) if mask is None else (mask != 0).double()
    rows = []
    for r in range(T):
        p = S - T + r
        logits = torch.einsum("bkhd,bshd->bkhs", q[:, r], k[:, :p + 1]) * scale  # [B,K,H,p+1]
        z = torch.sigmoid(logits) * keep[:, None, None, :p + 1]
        one_minus = 1 - z
        # behind[j] = prod_{m > j} (1 - z_m): reversed exclusive cumulative product
        behind = torch.cat([one_minus[..., 1:].flip(-1).cumprod(-1).flip(-1), torch.ones_like(z[..., :1])], -1)
        A = z * behind
        rows.append(torch.einsum("bkhs,bshd->bkhd", A, v[:, :p + 1]))
    return torch.stack(rows, 1)  # [B,T,K,H,D]


def naive_bf16(q, k, v):
    """IBM's original evaluation in the input dtype (bf16): T x T triangular matmul on logsigmoid(-l)."""
    B, T, K, H, D = q.shape
    logits = torch.einsum("btkhd,bshd->bkhts", q, k) / math.sqrt(D)
    s = torch.nn.functional.logsigmoid(-logits)
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    s = s.masked_fill(~causal, 0)
    U = torch.ones(T, T, dtype=q.dtype).tril(-1)  # U[m, j] = 1 iff m > j
    R = s @ U
    A = torch.exp(torch.nn.functional.logsigmoid(logits) + R).masked_fill(~causal, 0)
    return torch.einsum("bkhts,bshd->btkhd", A, v)


def rand_inputs(B, T, S, K, H, D, dtype=torch.float32, seed=0, q_scale=1.0):
    g = torch.Generator().manual_seed(seed)
    q = (torch.randn(B, T, K, H, D, generator=g) * q_scale).to(dtype)
    k = torch.randn(B, S, H, D, generator=g).to(dtype)
    v = torch.randn(B, S, H, D, generator=g).to(dtype)
    return q, k, v


def left_pad_mask(B, S, pads):
    m = torch.ones(B, S)
    for b, n in enumerate(pads):
        m[b, :n] = 0
    return m


# ------------------------------------------------------------------ forward + gradients vs reference

SHAPES = [
    # B, T,  S,  K, H, D,  block, key_block
    (2, 37, 37, 2, 3, 16, 8, 16),  # several row blocks, T not a multiple of the block, carried sums
    (1, 1, 1, 1, 1, 8, 64, 128),  # T = S = 1
    (2, 1, 45, 2, 2, 8, 4, 8),  # decode: one query over a cache (direct path)
    (2, 3, 45, 2, 2, 8, 4, 8),  # speculative decode: 3 queries over a cache (direct path)
    (1, 5, 45, 2, 2, 8, 2, 8),  # just above the direct-path limit: blocked path with offset
    (1, 29, 50, 3, 2, 16, 8, 8),  # prefill after a cache (offset 21), K = 3
    (1, 40, 40, 1, 2, 16, 64, 128),  # K = 1, a single block
    (2, 40, 52, 2, 2, 16, 16, 8),  # multiple key chunks per row block with an offset
]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}T{}S{}K{}H{}D{}b{}kb{}".format(*s))
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "leftpad"])
def test_matches_reference_fp32(shape, masked):
    B, T, S, K, H, D, bs, kb = shape
    q, k, v = rand_inputs(B, T, S, K, H, D, seed=T + S)
    mask = left_pad_mask(B, S, [min(3, S - 1), S // 2][:B]) if masked else None
    q.requires_grad_(), k.requires_grad_(), v.requires_grad_()
    out = stick_breaking_attention(q, k, v, mask, block_size=bs, key_block_size=kb)
    assert out.shape == q.shape and out.dtype == torch.float32

    qd, kd, vd = (x.detach().double().requires_grad_() for x in (q, k, v))
    ref = ref_attention(qd, kd, vd, mask)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)

    grad = torch.randn_like(ref)
    got = torch.autograd.grad(out, (q, k, v), grad.float())
    want = torch.autograd.grad(ref, (qd, kd, vd), grad)
    for name, a, b in zip("qkv", got, want):
        torch.testing.assert_close(a.double(), b, atol=5e-5, rtol=1e-4, msg=f"d{name}")


def test_gradcheck_fp64():
    q, k, v = rand_inputs(2, 6, 8, 2, 1, 4, dtype=torch.float64)
    mask = left_pad_mask(2, 8, [0, 3])
    mask[0, 5] = 0  # a hole in the middle
    inputs = tuple(x.requires_grad_() for x in (q, k, v))
    assert torch.autograd.gradcheck(
        lambda a, b, c: stick_breaking_attention(a, b, c, mask, block_size=4, key_block_size=3), inputs,
        fast_mode=True)


def test_scale_argument():
    q, k, v = rand_inputs(1, 12, 12, 2, 2, 8)
    out = stick_breaking_attention(q, k, v, scale=0.3, block_size=4, key_block_size=4)
    torch.testing.assert_close(out.double(), ref_attention(q, k, v, scale=0.3), atol=1e-5, rtol=1e-5)


def test_mask_dtypes_agree():
    q, k, v = rand_inputs(2, 10, 14, 2, 2, 8)
    m = left_pad_mask(2, 14, [2, 5])
    outs = [stick_breaking_attention(q, k, v, mm, block_size=4) for mm in (m, m.bool(), m.long())]
    for o in outs[1:]:
        torch.testing.assert_close(o, outs[0], atol=0, rtol=0)
    # an all-ones mask is the same as no mask
    torch.testing.assert_close(stick_breaking_attention(q, k, v, torch.ones(2, 14), block_size=4),
                               stick_breaking_attention(q, k, v, None, block_size=4), atol=0, rtol=0)


def test_non_contiguous_inputs():
    q, k, v = rand_inputs(1, 16, 16, 2, 2, 8)
    qn = torch.cat([q, q], -1)[..., ::2]  # strided views
    kn = k.transpose(1, 2).contiguous().transpose(1, 2)
    out = stick_breaking_attention(qn, kn, v, block_size=4, key_block_size=8)
    torch.testing.assert_close(out.double(), ref_attention(qn, kn, v), atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------ masking semantics


def test_fully_masked_row_is_zero_and_finite():
    q, k, v = rand_inputs(2, 12, 12, 2, 2, 8)
    mask = left_pad_mask(2, 12, [0, 12])  # batch 1 fully masked
    mask[0, :5] = 0  # batch 0: rows 0..4 see only masked keys
    q.requires_grad_(), k.requires_grad_(), v.requires_grad_()
    out = stick_breaking_attention(q, k, v, mask, block_size=4, key_block_size=4)
    assert torch.isfinite(out).all()
    assert (out[1] == 0).all() and (out[0, :5] == 0).all()
    out.sum().backward()
    assert all(torch.isfinite(x.grad).all() for x in (q, k, v))
    assert (k.grad[1] == 0).all() and (v.grad[1] == 0).all()


def test_left_padding_invariance():
    """A left-padded row with its mask equals the unpadded sequence at the real positions."""
    T, pad = 21, 6
    q, k, v = rand_inputs(1, T, T, 2, 2, 16)
    qp, kp, vp = rand_inputs(1, T + pad, T + pad, 2, 2, 16, seed=7)  # garbage in the padded slots
    qp[:, pad:], kp[:, pad:], vp[:, pad:] = q, k, v
    mask = left_pad_mask(1, T + pad, [pad])
    plain = stick_breaking_attention(q, k, v, block_size=8, key_block_size=8)
    padded = stick_breaking_attention(qp, kp, vp, mask, block_size=8, key_block_size=8)
    torch.testing.assert_close(padded[:, pad:], plain, atol=1e-6, rtol=1e-5)


def test_causality():
    q, k, v = rand_inputs(1, 24, 24, 2, 2, 8)
    out = stick_breaking_attention(q, k, v, block_size=8, key_block_size=8)
    t = 10
    k2, v2 = k.clone(), v.clone()
    k2[:, t + 1:] += 5 * torch.randn_like(k2[:, t + 1:])
    v2[:, t + 1:] += 5 * torch.randn_like(v2[:, t + 1:])
    out2 = stick_breaking_attention(q, k2, v2, block_size=8, key_block_size=8)
    torch.testing.assert_close(out2[:, :t + 1], out[:, :t + 1], atol=0, rtol=0)
    assert not torch.equal(out2[:, t + 1:], out[:, t + 1:])


def test_incremental_decoding_matches_full():
    """Prefill 9 then 1, 4 and 1 tokens over the growing cache == one full pass."""
    q, k, v = rand_inputs(2, 15, 15, 2, 2, 8)
    mask = left_pad_mask(2, 15, [0, 3])
    full = stick_breaking_attention(q, k, v, mask, block_size=4, key_block_size=4)
    parts, start = [], 0
    for end in (9, 10, 14, 15):
        parts.append(stick_breaking_attention(q[:, start:end], k[:, :end], v[:, :end], mask[:, :end],
                                              block_size=4, key_block_size=4))
        start = end
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-6, rtol=1e-5)


# ------------------------------------------------------------------ precision


def test_large_logits_stay_finite():
    q, k, v = rand_inputs(1, 40, 40, 2, 2, 16, q_scale=10.0)  # logits up to ~100
    q.requires_grad_(), k.requires_grad_(), v.requires_grad_()
    out = stick_breaking_attention(q, k, v, block_size=8, key_block_size=16)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), ref_attention(q, k, v), atol=1e-5, rtol=1e-5)
    out.square().sum().backward()
    assert all(torch.isfinite(x.grad).all() for x in (q, k, v))


def test_huge_logits_are_clamped_not_nan():
    q, k, v = rand_inputs(1, 16, 16, 1, 1, 8, q_scale=1000.0)  # |logits| >> 100: exercises the clamp pass
    out = stick_breaking_attention(q, k, v, block_size=4, key_block_size=4)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), ref_attention(q, k, v), atol=1e-5, rtol=1e-5)


def shifted_inputs(T, D, shift, dtype=torch.float32):
    """Inputs whose logits are ~N(-shift, 1): small z, so the stick stays long and sums run over many keys."""
    q, k, v = rand_inputs(1, T, T, 2, 1, D)
    q = torch.cat([q, torch.ones_like(q[..., :1])], -1)
    k = torch.cat([k, torch.full_like(k[..., :1], -shift * math.sqrt(D + 1))], -1)
    v = torch.cat([v, v[..., :1]], -1)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def test_bf16_accuracy_vs_naive_bf16():
    qb, kb, vb = shifted_inputs(128, 15, 4.0, torch.bfloat16)
    ref = ref_attention(qb, kb, vb)  # exact result for the bf16 inputs: isolates the computation error
    out = stick_breaking_attention(qb, kb, vb, block_size=16, key_block_size=32)
    assert out.dtype == torch.bfloat16
    ours = (out.double() - ref).abs().mean().item()
    rounding = (ref.bfloat16().double() - ref).abs().mean().item()  # best possible: round the exact result
    naive = (naive_bf16(qb, kb, vb).double() - ref).abs().mean().item()
    assert ours <= 1.05 * rounding, (ours, rounding)
    assert ours * 4 < naive, (ours, naive)  # measured ~6x: the bf16 T x T cumulative matmul loses precision


def test_bf16_gradients_close():
    q, k, v = rand_inputs(1, 33, 33, 2, 2, 16)
    qb, kb, vb = (x.bfloat16().requires_grad_() for x in (q, k, v))
    out = stick_breaking_attention(qb, kb, vb, block_size=8, key_block_size=8)
    grad = torch.randn_like(out)
    out.backward(grad)
    qd, kd, vd = (x.detach().double().requires_grad_() for x in (qb, kb, vb))
    ref_attention(qd, kd, vd).backward(grad.double())
    for a, b in ((qb, qd), (kb, kd), (vb, vd)):
        assert a.grad.dtype == torch.bfloat16
        torch.testing.assert_close(a.grad.double(), b.grad, atol=3e-2, rtol=3e-2)


def test_long_row_accumulation_fp32():
    """Small logits (z ~ 1e-3): the stick lasts for the whole row; carried sums over many chunks stay exact."""
    q, k, v = rand_inputs(1, 8, 600, 1, 1, 16, q_scale=0.05)
    # an extra constant component shifts every logit by -7: z ~ 1e-3 everywhere, the stick never runs out
    q7 = torch.cat([q, torch.full_like(q[..., :1], 1.0)], -1)
    k7 = torch.cat([k, torch.full_like(k[..., :1], -7.0 * math.sqrt(17))], -1)
    v7 = torch.cat([v, v[..., :1]], -1)
    out = stick_breaking_attention(q7, k7, v7, block_size=4, key_block_size=16)
    ref = ref_attention(q7, k7, v7)
    torch.testing.assert_close(out.double(), ref, atol=2e-6, rtol=1e-5)


# ------------------------------------------------------------------ the underflow skip


def test_skip_underflow_is_exact():
    q, k, v = rand_inputs(1, 256, 300, 2, 2, 16, q_scale=2.0)
    p = sbmod._Prepared(q, k, v, None, 1 / 4)
    _, chunks_skip = sbmod._forward(p, 32, 32, True)
    _, chunks_full = sbmod._forward(p, 32, 32, False)
    assert sum(chunks_skip) < sum(chunks_full)  # the skip did trigger
    qs, ks, vs = (x.clone().requires_grad_() for x in (q, k, v))
    qf, kf, vf = (x.clone().requires_grad_() for x in (q, k, v))
    a = stick_breaking_attention(qs, ks, vs, block_size=32, key_block_size=32)
    b = stick_breaking_attention(qf, kf, vf, block_size=32, key_block_size=32, skip_underflow=False)
    torch.testing.assert_close(a, b, atol=1e-30, rtol=0)
    grad = torch.randn_like(a)
    a.backward(grad)
    b.backward(grad)
    # not bitwise: without the skip, used-up keys get dl = z * (G - suffix) = z * rounding noise (~1e-7 each)
    for x, y in ((qs, qf), (ks, kf), (vs, vf)):
        torch.testing.assert_close(x.grad, y.grad, atol=5e-5, rtol=1e-4)


# ------------------------------------------------------------------ API


def test_shape_errors():
    q, k, v = rand_inputs(1, 5, 4, 1, 1, 8)
    with pytest.raises(ValueError):
        stick_breaking_attention(q, k, v)  # S < T
    q, k, v = rand_inputs(1, 4, 4, 1, 1, 8)
    with pytest.raises(ValueError):
        stick_breaking_attention(q, k, v, torch.ones(1, 3))
    with pytest.raises(ValueError):
        stick_breaking_attention(q[0], k, v)


def test_benchmark_smoke():
    from moduleformer_exit.benchmarks.attention import bench_stick_breaking

    rows = bench_stick_breaking(seq_lens=(8, 17), query_heads=4, head_dim=8, repeats=1)
    assert [r["T"] for r in rows] == [8, 17]
    for r in rows:
        assert r["sb_ms"] > 0 and r["sdpa_ms"] > 0 and r["ratio"] > 0
        assert r["sb_peak_mb"] > 0


@pytest.mark.parametrize("queries", [1, 3, 64])
def test_no_weight_is_small_enough_to_make_denormal_products(monkeypatch, queries):
    """Every weight fed to the A.V GEMM is 0 or >= 2**-100, so its products with values |v| >= 2**-26 are normal
    fp32 (denormal operands take the CPU's slow path: 10x slower forwards on Intel). Used-up sticks (N(0,1) inputs,
    long rows) push most weights to the floor; the blocked path (T=64) and the decode path (T=1, 3) are checked."""
    seen = []
    real_bmm, real_baddbmm, real_matmul = torch.bmm, torch.Tensor.baddbmm_, torch.matmul

    def record(a):
        seen.append(a.detach().clone())

    def bmm(a, b, out=None):
        result = real_bmm(a, b, out=out) if out is not None else real_bmm(a, b)
        if b.shape[-1] == 16:  # A [.., M, n] @ V [.., n, D=16]
            record(a)
        return result

    def baddbmm_(self, a, b):
        record(a)
        return real_baddbmm(self, a, b)

    def matmul(a, b):
        if b.shape[-1] == 16 and a.shape[-1] == b.shape[-2] and a.shape[-1] != 16:
            record(a)
        return real_matmul(a, b)

    monkeypatch.setattr(torch, "bmm", bmm)
    monkeypatch.setattr(torch.Tensor, "baddbmm_", baddbmm_)
    monkeypatch.setattr(torch, "matmul", matmul)
    gen = torch.Generator().manual_seed(0)
    S = 300
    q = torch.randn(1, queries, 2, 2, 16, generator=gen) * 2
    k, v = torch.randn(1, S, 2, 16, generator=gen) * 2, torch.randn(1, S, 2, 16, generator=gen)
    with torch.no_grad():
        stick_breaking_attention(q, k, v, skip_underflow=False)
    assert seen, "no A.V product was observed"
    weights = torch.cat([w.flatten() for w in seen])
    positive = weights[weights > 0]
    assert (weights >= 0).all() and positive.min() >= 2.0 ** -100
    assert (positive == 2.0 ** -100).sum() > 100  # the floor is reached: used-up sticks are exercised
