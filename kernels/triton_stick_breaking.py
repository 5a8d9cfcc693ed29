"""Flash-style Triton kernels for ModuleFormer stick-breaking attention (forward + deterministic backward).

Semantics are those of :func:`kernels.stick_breaking.stick_breaking_attention` (diagonal included, no remainder,
padding mask before the sigmoid, queries = the last T of S positions). For one (batch, query set, head), query row
i at absolute position p_i and key j <= p_i, in base 2 (``x = scale * q_i.k_j / ln 2``)::

    sp_ij   = softplus2(x_ij) = log2(1 + 2**x_ij) = -log2(1 - z_ij)       (0 for masked / invisible keys)
    log2 A_ij = x_ij - sum_{j <= m <= p_i} sp_im                              (inclusive reverse cumsum)
    out_i   = sum_j A_ij v_j

Layout: the K query sets that share one K/V head are folded into the row dimension (row m = t*K + k of the
[B, T, K, H, D] query tensor, read through strides: no copies), so one program serves BLOCK_M rows of one
(batch, kv-head) and every K/V tile it loads is used by all K query sets.

Forward (grid: query blocks x B*H): walk key blocks from the diagonal backwards, carrying per row the sum of sp
over the blocks already visited; in-block inclusive reverse cumsum with ``tl.cumsum(reverse=True)``; every
log2 A <= 0, so no running max / rescaling. Nothing of size T x S is stored.

Backward, with g_ij = A_ij (do_i . v_j) and G_i = sum_j g_ij = do_i . out_i (computed from the fp32 output)::

    dl_ij = g_ij - z_ij * sum_{m <= j} g_im = g_ij - z_ij * (G_i - sum_{m > j} g_im)     (natural-log logits)
    dq_i = scale sum_j dl_ij k_j,   dk_j = scale sum_i dl_ij q_i,   dv_j = sum_i A_ij do_i

- pass 1 (one program per query block): walks key blocks in exactly the forward order, so it recomputes
  bit-identical A (the same carries; no ``total - prefix`` cancellation), accumulates dq, and records for every
  (row, key block) the two carries entering that block (sum of sp and of g over the key blocks to its right);
- pass 2 (one program per key block): loops over the query blocks that see it, rebuilds A and dl from the
  recorded carries and accumulates dk, dv in registers. Every output element has exactly one writer: no atomics,
  no locks, bitwise deterministic.

The carry buffers hold 2 * B*H * T*K * ceil(S / BLOCK_N) floats during backward only (1/BLOCK_N of a T x S
matrix; e.g. 134 MB for B*H=16, T=S=8192, K=1, BLOCK_N=64).

Precision: fp32 accumulators (fp64 for fp64 inputs). On GPU, bf16/fp16 operands go to tensor cores (p and dl are
cast to the input dtype for their matmuls, as in FlashAttention); fp32 inputs use IEEE fp32 dots (no TF32).
Under the Triton interpreter (CPU tests), bf16/fp16 tiles are upcast before ``tl.dot`` (its bf16 dot is wrong).
"""
from __future__ import annotations

import contextlib
import math
import os
from typing import Optional

import torch
from torch import Tensor

from .checks import check_attention_mask, check_attention_shapes

try:  # guarded: the package must import without triton
    import triton
    import triton.language as tl

    HAS_TRITON = True
except Exception:  # pragma: no cover - exercised only on machines without triton
    triton = None
    tl = None
    HAS_TRITON = False

__all__ = ["HAS_TRITON", "triton_stick_breaking_attention"]

_LOG2E = 1.0 / math.log(2.0)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


if HAS_TRITON:

    @triton.jit
    def _softplus2(x, HI: tl.constexpr, LO: tl.constexpr):
        # log2(1 + 2**x) without libdevice log1p. Above HI: x + 2**-x / ln2 (no overflow; the bare `x` shortcut
        # is off by 4e-5 at x = 15, visible in fp32 outputs). Below LO: 2**x / ln2 (1 + 2**x rounds to 1 there).
        mid = tl.log2(1.0 + tl.exp2(x))
        small = tl.exp2(x) * 1.4426950408889634
        big = x + tl.exp2(-x) * 1.4426950408889634
        return tl.where(x < HI, tl.where(x < LO, small, mid), big)

    @triton.jit
    def _dot(a, b, ACC: tl.constexpr):
        return tl.dot(a, b, out_dtype=ACC, input_precision="ieee")

    @triton.jit
    def _load_rows(ptr, b, h, offs_m, offs_d, row_ok, d_ok, sb, st, sk, sh, sd, KQ: tl.constexpr):
        # rows m = t*KQ + k of a [B, T, KQ, H, D] strided tensor
        t = offs_m // KQ
        kk = offs_m % KQ
        ptrs = ptr + b * sb + h * sh + t[:, None] * st + kk[:, None] * sk + offs_d[None, :] * sd
        return tl.load(ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)

    @triton.jit
    def _block_weights(qk, offs_n, pos, row_ok, Keep, b, smb, sms, S, acc, HAS_MASK: tl.constexpr,
                       HI: tl.constexpr, LO: tl.constexpr):
        # (valid, sp, A) for one [BLOCK_M, BLOCK_N] tile given the carry `acc` entering it
        valid = (offs_n[None, :] <= pos[:, None]) & row_ok[:, None]
        if HAS_MASK:
            keep = tl.load(Keep + b * smb + offs_n * sms, mask=offs_n < S, other=0)
            valid = valid & (keep != 0)[None, :]
        sp = tl.where(valid, _softplus2(qk, HI, LO), 0.0)
        cs = tl.cumsum(sp, axis=1, reverse=True) + acc[:, None]
        p = tl.where(valid, tl.exp2(qk - cs), 0.0)
        return valid, sp, p

    @triton.jit
    def _sb_fwd_kernel(Q, Kt, V, Keep, O, Scale,
                       sqb, sqt, sqk, sqh, sqd,
                       skb, sks, skh, skd,
                       svb, svs, svh, svd,
                       sob, sot, sok, soh, sod,
                       smb, sms,
                       T, S, H, D,
                       KQ: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                       HAS_MASK: tl.constexpr, ACC: tl.constexpr, UPCAST: tl.constexpr,
                       HI: tl.constexpr, LO: tl.constexpr):
        pid_m = tl.program_id(0)
        pid_bh = tl.program_id(1).to(tl.int64)  # int64 offsets: B*H*T*K*NKB may exceed 2**31
        b = pid_bh // H
        h = pid_bh % H
        TK = T * KQ
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = offs_m < TK
        pos = S - T + offs_m // KQ  # absolute position of each query row
        offs_d = tl.arange(0, BLOCK_D)
        d_ok = offs_d < D
        qk_scale = tl.load(Scale)  # scale / ln2 in the accumulator dtype (a fp32 scalar arg would round fp64)
        q = _load_rows(Q, b, h, offs_m, offs_d, row_ok, d_ok, sqb, sqt, sqk, sqh, sqd, KQ)
        if UPCAST:
            q = q.to(ACC)
        last_row = tl.minimum(pid_m * BLOCK_M + BLOCK_M, TK) - 1
        n_blocks = (S - T + last_row // KQ) // BLOCK_N + 1
        acc = tl.zeros([BLOCK_M], dtype=ACC)
        o = tl.zeros([BLOCK_M, BLOCK_D], dtype=ACC)
        for i in range(n_blocks):
            jb = n_blocks - 1 - i  # from the diagonal backwards
            offs_n = jb * BLOCK_N + tl.arange(0, BLOCK_N)
            kv_mask = (offs_n < S)[:, None] & d_ok[None, :]
            k = tl.load(Kt + b * skb + h * skh + offs_n[:, None] * sks + offs_d[None, :] * skd, mask=kv_mask,
                        other=0.0)
            v = tl.load(V + b * svb + h * svh + offs_n[:, None] * svs + offs_d[None, :] * svd, mask=kv_mask,
                        other=0.0)
            if UPCAST:
                k = k.to(ACC)
                v = v.to(ACC)
            qk = _dot(q, tl.trans(k), ACC) * qk_scale
            valid, sp, p = _block_weights(qk, offs_n, pos, row_ok, Keep, b, smb, sms, S, acc, HAS_MASK, HI, LO)
            acc += tl.sum(sp, axis=1)
            o += _dot(p.to(v.dtype), v, ACC)
        t = offs_m // KQ
        kk = offs_m % KQ
        tl.store(O + b * sob + h * soh + t[:, None] * sot + kk[:, None] * sok + offs_d[None, :] * sod, o,
                 mask=row_ok[:, None] & d_ok[None, :])

    @triton.jit
    def _sb_bwd_dq_kernel(Q, Kt, V, Keep, DO, G, DQ, Csp, Cg, Scale,
                          sqb, sqt, sqk, sqh, sqd,
                          skb, sks, skh, skd,
                          svb, svs, svh, svd,
                          sdb, sdt, sdk, sdh, sdd,
                          sgb, sgt, sgk, sgh, sgd,
                          smb, sms,
                          T, S, H, D, NKB,
                          KQ: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                          HAS_MASK: tl.constexpr, ACC: tl.constexpr, UPCAST: tl.constexpr,
                          HI: tl.constexpr, LO: tl.constexpr):
        # DQ / G / carries are contiguous compute-dtype buffers: DQ [B,T,KQ,H,D] (strides sg*), G [B*H, T*KQ],
        # Csp / Cg [B*H, NKB, T*KQ]
        pid_m = tl.program_id(0)
        pid_bh = tl.program_id(1).to(tl.int64)  # int64 offsets: B*H*T*K*NKB may exceed 2**31
        b = pid_bh // H
        h = pid_bh % H
        TK = T * KQ
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = offs_m < TK
        pos = S - T + offs_m // KQ
        offs_d = tl.arange(0, BLOCK_D)
        d_ok = offs_d < D
        qk_scale = tl.load(Scale)
        q = _load_rows(Q, b, h, offs_m, offs_d, row_ok, d_ok, sqb, sqt, sqk, sqh, sqd, KQ)
        do = _load_rows(DO, b, h, offs_m, offs_d, row_ok, d_ok, sdb, sdt, sdk, sdh, sdd, KQ)
        if UPCAST:
            q = q.to(ACC)
            do = do.to(ACC)
        g_row = tl.load(G + pid_bh * TK + offs_m, mask=row_ok, other=0.0)
        c_ptr = pid_bh * NKB * TK + offs_m  # carries [B*H, NKB, T*K]: row-contiguous for a fixed key block
        last_row = tl.minimum(pid_m * BLOCK_M + BLOCK_M, TK) - 1
        n_blocks = (S - T + last_row // KQ) // BLOCK_N + 1
        acc = tl.zeros([BLOCK_M], dtype=ACC)
        accg = tl.zeros([BLOCK_M], dtype=ACC)
        dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=ACC)
        for i in range(n_blocks):
            jb = n_blocks - 1 - i  # same order as the forward: bit-identical A
            offs_n = jb * BLOCK_N + tl.arange(0, BLOCK_N)
            kv_mask = (offs_n < S)[:, None] & d_ok[None, :]
            k = tl.load(Kt + b * skb + h * skh + offs_n[:, None] * sks + offs_d[None, :] * skd, mask=kv_mask,
                        other=0.0)
            v = tl.load(V + b * svb + h * svh + offs_n[:, None] * svs + offs_d[None, :] * svd, mask=kv_mask,
                        other=0.0)
            if UPCAST:
                k = k.to(ACC)
                v = v.to(ACC)
            tl.store(Csp + c_ptr + jb * TK, acc, mask=row_ok)
            tl.store(Cg + c_ptr + jb * TK, accg, mask=row_ok)
            qk = _dot(q, tl.trans(k), ACC) * qk_scale
            valid, sp, p = _block_weights(qk, offs_n, pos, row_ok, Keep, b, smb, sms, S, acc, HAS_MASK, HI, LO)
            g = p * _dot(do, tl.trans(v), ACC)
            # sum_{m <= j} g = G - (exclusive in-block suffix + suffix of the blocks to the right)
            pref = g_row[:, None] - (tl.cumsum(g, axis=1, reverse=True) - g + accg[:, None])
            z = tl.where(valid, tl.exp2(qk - sp), 0.0)
            dl = g - z * pref
            dq += _dot(dl.to(k.dtype), k, ACC)
            acc += tl.sum(sp, axis=1)
            accg += tl.sum(g, axis=1)
        t = offs_m // KQ
        kk = offs_m % KQ
        tl.store(DQ + b * sgb + h * sgh + t[:, None] * sgt + kk[:, None] * sgk + offs_d[None, :] * sgd, dq,
                 mask=row_ok[:, None] & d_ok[None, :])

    @triton.jit
    def _sb_bwd_dkdv_kernel(Q, Kt, V, Keep, DO, G, DK, DV, Csp, Cg, Scale,
                            sqb, sqt, sqk, sqh, sqd,
                            skb, sks, skh, skd,
                            svb, svs, svh, svd,
                            sdb, sdt, sdk, sdh, sdd,
                            srb, srs, srh, srd,
                            smb, sms,
                            T, S, H, D, NKB,
                            KQ: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                            BLOCK_D: tl.constexpr, HAS_MASK: tl.constexpr, ACC: tl.constexpr,
                            UPCAST: tl.constexpr, HI: tl.constexpr, LO: tl.constexpr):
        # one program owns key block jb of one (batch, head): DK / DV [B,S,H,D] contiguous (strides sr*)
        jb = tl.program_id(0)
        pid_bh = tl.program_id(1).to(tl.int64)  # int64 offsets: B*H*T*K*NKB may exceed 2**31
        b = pid_bh // H
        h = pid_bh % H
        TK = T * KQ
        offs_n = jb * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        d_ok = offs_d < D
        kv_mask = (offs_n < S)[:, None] & d_ok[None, :]
        qk_scale = tl.load(Scale)
        k = tl.load(Kt + b * skb + h * skh + offs_n[:, None] * sks + offs_d[None, :] * skd, mask=kv_mask, other=0.0)
        v = tl.load(V + b * svb + h * svh + offs_n[:, None] * svs + offs_d[None, :] * svd, mask=kv_mask, other=0.0)
        if UPCAST:
            k = k.to(ACC)
            v = v.to(ACC)
        dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=ACC)
        dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=ACC)
        # first query row whose position reaches this key block; earlier rows cannot see it
        first_t = tl.maximum(jb * BLOCK_N - (S - T), 0)
        start = (first_t * KQ) // BLOCK_M
        n_qb = tl.cdiv(TK, BLOCK_M)
        for ib in range(start, n_qb):
            offs_m = ib * BLOCK_M + tl.arange(0, BLOCK_M)
            row_ok = offs_m < TK
            pos = S - T + offs_m // KQ
            q = _load_rows(Q, b, h, offs_m, offs_d, row_ok, d_ok, sqb, sqt, sqk, sqh, sqd, KQ)
            do = _load_rows(DO, b, h, offs_m, offs_d, row_ok, d_ok, sdb, sdt, sdk, sdh, sdd, KQ)
            if UPCAST:
                q = q.to(ACC)
                do = do.to(ACC)
            g_row = tl.load(G + pid_bh * TK + offs_m, mask=row_ok, other=0.0)
            c_ptr = pid_bh * NKB * TK + jb * TK + offs_m
            acc = tl.load(Csp + c_ptr, mask=row_ok, other=0.0)
            accg = tl.load(Cg + c_ptr, mask=row_ok, other=0.0)
            qk = _dot(q, tl.trans(k), ACC) * qk_scale
            valid, sp, p = _block_weights(qk, offs_n, pos, row_ok, Keep, b, smb, sms, S, acc, HAS_MASK, HI, LO)
            g = p * _dot(do, tl.trans(v), ACC)
            pref = g_row[:, None] - (tl.cumsum(g, axis=1, reverse=True) - g + accg[:, None])
            z = tl.where(valid, tl.exp2(qk - sp), 0.0)
            dl = g - z * pref
            dv += _dot(tl.trans(p.to(do.dtype)), do, ACC)
            dk += _dot(tl.trans(dl.to(q.dtype)), q, ACC)
        out_mask = (offs_n < S)[:, None] & d_ok[None, :]
        tl.store(DK + b * srb + h * srh + offs_n[:, None] * srs + offs_d[None, :] * srd, dk, mask=out_mask)
        tl.store(DV + b * srb + h * srh + offs_n[:, None] * srs + offs_d[None, :] * srd, dv, mask=out_mask)


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _consts(q: Tensor, block_m: int, block_n: int) -> dict:
    acc = _acc_dtype(q.dtype)
    D = q.shape[-1]
    return dict(
        KQ=q.shape[2], BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=max(16, triton.next_power_of_2(D)),
        ACC=tl.float64 if acc == torch.float64 else tl.float32,
        # the interpreter runs bf16 tl.dot on raw bits: upcast low-precision tiles there
        UPCAST=_interpreting() and q.dtype in (torch.bfloat16, torch.float16),
        HI=50.0 if acc == torch.float64 else 15.0, LO=-50.0 if acc == torch.float64 else -15.0,
    )


def _default_blocks(q: Tensor) -> tuple:
    if _interpreting():  # few programs: the interpreter costs ~1 ms per program
        return 32, 32
    return 64, 64


class _TritonStickBreakingFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, keep, scale, block_m, block_n):
        B, T, KQ, H, D = q.shape
        S = k.shape[1]
        acc = _acc_dtype(q.dtype)
        c = _consts(q, block_m, block_n)
        scale_t = torch.tensor([scale * _LOG2E], dtype=acc, device=q.device)
        o = torch.empty(B, T, KQ, H, D, dtype=acc, device=q.device)
        keep_t = keep if keep is not None else q.new_empty(1, 1, dtype=torch.int8)
        grid = (triton.cdiv(T * KQ, block_m), B * H)
        _sb_fwd_kernel[grid](q, k, v, keep_t, o, scale_t, *q.stride(), *k.stride(), *v.stride(), *o.stride(),
                             *keep_t.stride(), T, S, H, D, HAS_MASK=keep is not None, **c)
        ctx.save_for_backward(q, k, v, keep, o)
        ctx.cfg = (scale, block_m, block_n)
        return o.to(q.dtype)

    @staticmethod
    def backward(ctx, dout):
        q, k, v, keep, o = ctx.saved_tensors
        scale, block_m, block_n = ctx.cfg
        B, T, KQ, H, D = q.shape
        S = k.shape[1]
        acc = _acc_dtype(q.dtype)
        c = _consts(q, block_m, block_n)
        dev = q.device
        scale_t = torch.tensor([scale * _LOG2E], dtype=acc, device=dev)
        # G_i = sum_j g_ij = do_i . out_i (fp32/fp64 output): [B*H, T*K]
        G = (dout.to(acc) * o).sum(-1).permute(0, 3, 1, 2).reshape(B * H, T * KQ).contiguous()
        nkb = triton.cdiv(S, block_n)
        csp = torch.empty(B * H, nkb, T * KQ, dtype=acc, device=dev)  # carries entering each key block
        cg = torch.empty_like(csp)
        dq = torch.empty(B, T, KQ, H, D, dtype=acc, device=dev)
        dk = torch.empty(B, S, H, D, dtype=acc, device=dev)
        dv = torch.empty_like(dk)
        keep_t = keep if keep is not None else q.new_empty(1, 1, dtype=torch.int8)
        common = (*q.stride(), *k.stride(), *v.stride(), *dout.stride())
        _sb_bwd_dq_kernel[(triton.cdiv(T * KQ, block_m), B * H)](
            q, k, v, keep_t, dout, G, dq, csp, cg, scale_t, *common, *dq.stride(), *keep_t.stride(),
            T, S, H, D, nkb, HAS_MASK=keep is not None, **c)
        _sb_bwd_dkdv_kernel[(nkb, B * H)](
            q, k, v, keep_t, dout, G, dk, dv, csp, cg, scale_t, *common, *dk.stride(), *keep_t.stride(),
            T, S, H, D, nkb, HAS_MASK=keep is not None, **c)
        return ((dq * scale).to(q.dtype), (dk * scale).to(k.dtype), dv.to(v.dtype), None, None, None, None)


def triton_stick_breaking_attention(q: Tensor, k: Tensor, v: Tensor, attention_mask: Optional[Tensor] = None, *,
                                    scale: Optional[float] = None, block_m: Optional[int] = None,
                                    block_n: Optional[int] = None) -> Tensor:
    """ModuleFormer stick-breaking attention with the Triton kernels (differentiable w.r.t. q, k, v).

    Args:
        q: [B, T, K, H, D] queries (K query sets sharing each K/V head); the last T of S positions.
        k, v: [B, S, H, D], S >= T (S > T: KV-cache prefix; T = 1: decode). Any strides.
        attention_mask: optional [B, S] 0/1 (bool/int/float); masked keys get weight 0 and do not break the stick;
            a row with no visible key returns zeros.
        scale: logit scale, default 1/sqrt(D).
        block_m: query rows per program (rows = (position, query set) pairs); power of 2, >= 16.
        block_n: keys per tile; power of 2, >= 16. Defaults: 64/64 on GPU, 32/32 under the interpreter.

    Returns:
        [B, T, K, H, D] in q's dtype (accumulated in fp32; fp64 for fp64 inputs).

    Requires triton; CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1`` (set before triton kernels are
    first compiled).
    """
    if not HAS_TRITON:
        raise RuntimeError("triton_stick_breaking_attention needs triton (pip install triton)")
    B, T, KQ, H, D, S = check_attention_shapes(q, k, v)
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    dm, dn = _default_blocks(q)
    block_m = dm if block_m is None else int(block_m)
    block_n = dn if block_n is None else int(block_n)
    for name, bsz in (("block_m", block_m), ("block_n", block_n)):
        if bsz < 16 or bsz & (bsz - 1):
            raise ValueError(f"{name} must be a power of 2 >= 16, got {bsz}")
    if scale is None:
        scale = 1.0 / math.sqrt(D)
    keep = None
    check_attention_mask(attention_mask, B, S)
    if attention_mask is not None:
        keep = (attention_mask != 0).to(torch.int8)
    if T == 0 or B * H * KQ == 0 or D == 0:
        return q.new_zeros(B, T, KQ, H, D)
    # launch on the tensors' GPU, not the current one
    guard = torch.cuda.device(q.device) if q.is_cuda else contextlib.nullcontext()
    with guard:
        return _TritonStickBreakingFn.apply(q, k, v, keep, float(scale), block_m, block_n)
