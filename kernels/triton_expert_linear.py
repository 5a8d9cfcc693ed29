"""Triton backend of :func:`kernels.expert_linear.expert_linear`: scatter-to-scatter grouped GEMMs.

Design (ScatterMoE-style, written from the math; see shared notes §1):

- **No activation copies**: the forward GEMM gathers its input rows through the routing plan's sorted indices
  *inside* the kernel (row-indexed loads) and writes its output rows scattered (token-major) or grouped
  (expert-sorted) directly from the epilogue.
- **Tiles may straddle experts**: the grid is ``cdiv(P, BLOCK_M) x cdiv(out, BLOCK_N)`` with P = N*k, so it depends
  on shapes only (no host sync, no padded block plan). A tile runs one masked K-loop per expert id present in it
  (ids are sorted, so that is ``min..max`` of the tile's ids); rows of other experts load as zeros.
- **Backward**: dX is the same kernel with ``Wᵀ`` (a strided view, no copy) and the grouped/scattered roles swapped;
  dW is a separate kernel, one program per (expert, in-tile, out-tile) walking that expert's contiguous grouped
  rows, gathering both X and dY rows by index and folding the gate into the dY rows: every dW element is written
  by exactly one program, so it is deterministic (no atomics) and empty experts get exact zeros.
- **Gates**: the forward writes the k un-gated slot outputs token-major, ``[N, k, out]``, and combines them with a
  batched ``gates · Y`` (one small bmm). d(gates) uses ``dg_p = <dY_t Wᵀ, x_p>``: the un-gated dX rows the dX
  GEMM produces anyway, dotted with the input rows, so the forward's expanded output need not be saved.
- Accumulation in fp32 (fp64 for fp64 inputs: the accumulator dtype is a constexpr). Under the Triton interpreter
  (CPU tests) bf16/fp16 operands are upcast before ``tl.dot`` (the interpreter's low-precision dot is wrong).

Triton is imported lazily (first call), so ``import moduleformer_exit`` works without it.
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Optional

import torch
from torch import Tensor

from .backend import triton_interpret
from .routing import RoutingPlan

__all__ = ["ExpertBlocks", "DEFAULT_BLOCKS", "expert_blocks", "triton_expert_linear", "scatter2scatter", "expert_wgrad"]


@dataclasses.dataclass(frozen=True)
class ExpertBlocks:
    """Tile sizes and launch options (powers of two, each >= 16).

    ``m, n, k``: scatter2scatter tiles (rows, out columns, reduction step). ``w_m, w_k, w_n``: dW tiles (rows per
    step, in-dim tile, out-dim tile). Defaults are GPU-sized; tests use a large ``m`` / ``w_m`` with tiny dims so the
    interpreter runs few programs (it costs about 1 ms per program).
    """

    m: int = 128
    n: int = 128
    k: int = 32
    w_m: int = 32
    w_k: int = 128
    w_n: int = 128
    num_warps: int = 4
    num_stages: int = 3


DEFAULT_BLOCKS = ExpertBlocks()
_blocks_override: Optional[ExpertBlocks] = None


@contextlib.contextmanager
def expert_blocks(**sizes):
    """Temporarily change the tile sizes used by the ``"triton"`` backend of ``expert_linear`` (e.g. in tests:
    ``with expert_blocks(m=64, n=32, k=32): ...``). Fields as in :class:`ExpertBlocks`."""
    global _blocks_override
    previous = _blocks_override
    _blocks_override = dataclasses.replace(previous or DEFAULT_BLOCKS, **sizes)
    try:
        yield _blocks_override
    finally:
        _blocks_override = previous


def _current_blocks(blocks: Optional[ExpertBlocks], dtype: torch.dtype) -> ExpertBlocks:
    b = blocks or _blocks_override or DEFAULT_BLOCKS
    if dtype == torch.float64 and b is DEFAULT_BLOCKS:
        # fp64 tiles are 2x the bytes and fp64 accumulators 2x the registers of fp32: halve the GPU tiles.
        b = dataclasses.replace(b, m=64, n=64, k=16, w_k=64, w_n=64, num_stages=2)
    return b


# ---------------------------------------------------------------------------------------------------------------
# kernels (built on first use)
# ---------------------------------------------------------------------------------------------------------------

_KERNELS = None


def _kernels():
    """Compile-on-first-use: define the @triton.jit kernels (imports triton here, not at module import)."""
    global _KERNELS
    if _KERNELS is not None:
        return _KERNELS
    import triton
    import triton.language as tl

    @triton.jit
    def _s2s_kernel(
        X, W, Y, SORTED_E, SORTED_P,
        P, K, N,
        stride_xm, stride_xk, stride_we, stride_wk, stride_wn, stride_ym, stride_yn,
        NUM_EXPERTS,
        X_GROUPED: tl.constexpr, X_DIV: tl.constexpr, Y_GROUPED: tl.constexpr,
        ACC_DTYPE: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        # Grouped row m (expert-sorted position) of this tile -> expert e, pair p; x row = m or p // X_DIV,
        # y row = m or p.
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        valid = rm < P
        e = tl.load(SORTED_E + rm, mask=valid, other=0)
        if X_GROUPED:
            x_rows = rm.to(tl.int64)
        else:
            x_rows = tl.load(SORTED_P + rm, mask=valid, other=0).to(tl.int64) // X_DIV
        if Y_GROUPED:
            y_rows = rm.to(tl.int64)
        else:
            y_rows = tl.load(SORTED_P + rm, mask=valid, other=0).to(tl.int64)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = rn < N
        rk = tl.arange(0, BLOCK_K)
        # Expert ids are sorted, so the tile holds ids e_lo..e_hi (masked rows excluded from both).
        e_lo = tl.min(tl.where(valid, e, NUM_EXPERTS), axis=0)
        e_hi = tl.max(tl.where(valid, e, -1), axis=0)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)
        x_base = X + x_rows[:, None] * stride_xm
        for ee in range(e_lo, e_hi + 1):
            row_mask = valid & (e == ee)
            w_base = W + ee * stride_we + rn[None, :] * stride_wn  # ee: int64 like the ids
            for k0 in range(0, K, BLOCK_K):
                kk = k0 + rk
                k_mask = kk < K
                x = tl.load(x_base + kk[None, :] * stride_xk, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
                w = tl.load(w_base + kk[:, None] * stride_wk, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
                if UPCAST:
                    x = x.to(tl.float32)
                    w = w.to(tl.float32)
                acc = tl.dot(x, w, acc, input_precision=PRECISION, out_dtype=ACC_DTYPE)
        y_ptrs = Y + y_rows[:, None] * stride_ym + rn[None, :] * stride_yn
        tl.store(y_ptrs, acc.to(Y.dtype.element_ty), mask=valid[:, None] & n_mask[None, :])

    @triton.jit
    def _wgrad_kernel(
        X, DY, DW, OFFSETS, SORTED_P, G,
        K, N,
        stride_xm, stride_xk, stride_dym, stride_dyn, stride_we, stride_wk, stride_wn,
        X_GROUPED: tl.constexpr, X_DIV: tl.constexpr, DY_GROUPED: tl.constexpr, DY_DIV: tl.constexpr,
        HAS_G: tl.constexpr,
        ACC_DTYPE: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
    ):
        # dW[e, k-tile, n-tile] = sum over expert e's grouped rows r of x_row(r)ᵀ · (g_r · dy_row(r)).
        pid = tl.program_id(0)
        pid_n = tl.program_id(1)
        num_k_tiles = tl.cdiv(K, BLOCK_K)
        expert = pid // num_k_tiles
        pid_k = pid % num_k_tiles
        end = tl.load(OFFSETS + expert).to(tl.int32)
        start = tl.load(OFFSETS + expert - 1, mask=expert > 0, other=0).to(tl.int32)
        rk = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        k_mask = rk < K
        n_mask = rn < N
        acc = tl.zeros((BLOCK_K, BLOCK_N), dtype=ACC_DTYPE)
        for r0 in range(start, end, BLOCK_M):
            rm = r0 + tl.arange(0, BLOCK_M)
            valid = rm < end
            p = tl.load(SORTED_P + rm, mask=valid, other=0).to(tl.int64)
            if X_GROUPED:
                x_rows = rm.to(tl.int64)
            else:
                x_rows = p // X_DIV
            if DY_GROUPED:
                dy_rows = rm.to(tl.int64)
            else:
                dy_rows = p // DY_DIV
            # X tile loaded transposed: [BLOCK_K, BLOCK_M].
            xt = tl.load(X + x_rows[None, :] * stride_xm + rk[:, None] * stride_xk,
                         mask=k_mask[:, None] & valid[None, :], other=0.0)
            dy = tl.load(DY + dy_rows[:, None] * stride_dym + rn[None, :] * stride_dyn,
                         mask=valid[:, None] & n_mask[None, :], other=0.0)
            if HAS_G:
                g = tl.load(G + p, mask=valid, other=0.0)
                dy = (dy.to(ACC_DTYPE) * g.to(ACC_DTYPE)[:, None]).to(dy.dtype)
            if UPCAST:
                xt = xt.to(tl.float32)
                dy = dy.to(tl.float32)
            acc = tl.dot(xt, dy, acc, input_precision=PRECISION, out_dtype=ACC_DTYPE)
        w_ptrs = DW + expert.to(tl.int64) * stride_we + rk[:, None] * stride_wk + rn[None, :] * stride_wn
        tl.store(w_ptrs, acc.to(DW.dtype.element_ty), mask=k_mask[:, None] & n_mask[None, :])

    _KERNELS = (triton, tl, _s2s_kernel, _wgrad_kernel)
    return _KERNELS


def _dot_options(dtype: torch.dtype):
    """(accumulator dtype, upcast-before-dot flag, tl.dot input_precision) for operand dtype ``dtype``."""
    _, tl, _, _ = _kernels()
    interp = triton_interpret()
    if dtype == torch.float64:
        return tl.float64, False, "ieee"
    if dtype == torch.float32:
        tf32 = (not interp) and torch.backends.cuda.matmul.allow_tf32  # match torch's fp32 matmul setting
        return tl.float32, False, "tf32" if tf32 else "ieee"
    if dtype in (torch.bfloat16, torch.float16):
        return tl.float32, interp, "ieee"
    raise TypeError(f"expert_linear triton backend: unsupported dtype {dtype}")


# ---------------------------------------------------------------------------------------------------------------
# launchers
# ---------------------------------------------------------------------------------------------------------------


def scatter2scatter(
    x: Tensor,
    weight: Tensor,
    plan: RoutingPlan,
    *,
    x_grouped: bool,
    x_div: int,
    y_grouped: bool,
    blocks: Optional[ExpertBlocks] = None,
) -> Tensor:
    """Routed GEMM ``y_row(m) = x_row(m) @ weight[e_m]`` for every grouped (expert-sorted) position m.

    :param x: ``[*, in]`` any strides. Row read at position m: m if ``x_grouped`` else ``p_m // x_div``
        (p_m = ``plan.sorted_scattered_idxs[m]``).
    :param weight: ``[E, in, out]`` any strides (a transposed view is fine: that is how dX uses it).
    :param y_grouped: output rows in grouped order (m) instead of token-major pair order (p_m).
    :returns: ``[P, out]`` in x's dtype, P = ``plan.num_pairs``.
    """
    triton, _, s2s, _ = _kernels()
    b = _current_blocks(blocks, x.dtype)
    num_pairs = plan.num_pairs
    n_out = weight.shape[2]
    y = torch.empty(num_pairs, n_out, device=x.device, dtype=x.dtype)
    if num_pairs == 0 or n_out == 0:
        return y
    if x.shape[1] == 0:
        return y.zero_()
    acc, upcast, precision = _dot_options(x.dtype)
    grid = (triton.cdiv(num_pairs, b.m), triton.cdiv(n_out, b.n))
    s2s[grid](
        x, weight, y, plan.sorted_expert_idxs, plan.sorted_scattered_idxs,
        num_pairs, x.shape[1], n_out,
        x.stride(0), x.stride(1), weight.stride(0), weight.stride(1), weight.stride(2), y.stride(0), y.stride(1),
        plan.num_experts,
        X_GROUPED=x_grouped, X_DIV=x_div, Y_GROUPED=y_grouped,
        ACC_DTYPE=acc, UPCAST=upcast, PRECISION=precision,
        BLOCK_M=b.m, BLOCK_N=b.n, BLOCK_K=b.k, num_warps=b.num_warps, num_stages=b.num_stages,
    )
    return y


def expert_wgrad(
    x: Tensor,
    dy: Tensor,
    plan: RoutingPlan,
    *,
    x_grouped: bool,
    x_div: int,
    dy_grouped: bool,
    dy_div: int,
    gates: Optional[Tensor] = None,
    out_dtype: Optional[torch.dtype] = None,
    blocks: Optional[ExpertBlocks] = None,
) -> Tensor:
    """Per-expert weight gradient ``dW[e] = sum_{m in expert e} x_row(m)ᵀ · (g_{p_m} · dy_row(m))``.

    :param x: ``[*, in]``; row at grouped position m: m if ``x_grouped`` else ``p_m // x_div``.
    :param dy: ``[*, out]``; row at m: m if ``dy_grouped`` else ``p_m // dy_div``.
    :param gates: optional ``[N, k]`` (any layout); pair p's dy row is scaled by ``gates.flat[p]``.
    :returns: ``[E, in, out]`` in ``out_dtype`` (default x's dtype); zeros for experts with no rows.
    """
    triton, _, _, wgrad = _kernels()
    b = _current_blocks(blocks, x.dtype)
    n_in, n_out, num_e = x.shape[1], dy.shape[1], plan.num_experts
    dw = torch.empty(num_e, n_in, n_out, device=x.device, dtype=out_dtype or x.dtype)
    if plan.num_pairs == 0 or n_in == 0 or n_out == 0:
        return dw.zero_()
    if dy.dtype != x.dtype:
        dy = dy.to(x.dtype)
    g = gates.reshape(-1).contiguous() if gates is not None else x  # dummy pointer when HAS_G is False
    acc, upcast, precision = _dot_options(x.dtype)
    grid = (num_e * triton.cdiv(n_in, b.w_k), triton.cdiv(n_out, b.w_n))
    wgrad[grid](
        x, dy, dw, plan.expert_offsets, plan.sorted_scattered_idxs, g,
        n_in, n_out,
        x.stride(0), x.stride(1), dy.stride(0), dy.stride(1), dw.stride(0), dw.stride(1), dw.stride(2),
        X_GROUPED=x_grouped, X_DIV=x_div, DY_GROUPED=dy_grouped, DY_DIV=dy_div, HAS_G=gates is not None,
        ACC_DTYPE=acc, UPCAST=upcast, PRECISION=precision,
        BLOCK_M=b.w_m, BLOCK_K=b.w_k, BLOCK_N=b.w_n, num_warps=b.num_warps, num_stages=b.num_stages,
    )
    return dw


# ---------------------------------------------------------------------------------------------------------------
# autograd
# ---------------------------------------------------------------------------------------------------------------


def triton_expert_linear(
    x: Tensor,
    weight: Tensor,
    plan: RoutingPlan,
    *,
    fan_out: int,
    grouped_in: bool = False,
    grouped_out: bool = False,
    gates: Optional[Tensor] = None,
    blocks: Optional[ExpertBlocks] = None,
) -> Tensor:
    """Triton implementation of :func:`kernels.expert_linear.expert_linear` (same arguments, shapes and result;
    arguments are validated there). ``blocks`` overrides the tile sizes (default: :data:`DEFAULT_BLOCKS` or the
    :func:`expert_blocks` override). Differentiable in ``x``, ``weight`` and ``gates``."""
    if x.dtype != weight.dtype:
        raise TypeError(f"expert_linear triton backend needs x and weight of one dtype, got {x.dtype}, {weight.dtype}")
    return _TritonExpertLinear.apply(x, weight, gates, plan, fan_out, grouped_in, grouped_out, blocks)


class _TritonExpertLinear(torch.autograd.Function):
    """Forward: one scatter2scatter (+ a bmm gate combine). Backward: scatter2scatter with Wᵀ for dX (and, from
    the same un-gated rows, d(gates)); the dW kernel for dW. Saves only x, weight and gates."""

    @staticmethod
    def forward(ctx, x, weight, gates, plan, fan_out, grouped_in, grouped_out, blocks):
        k = plan.top_k
        y = scatter2scatter(x, weight, plan, x_grouped=grouped_in, x_div=fan_out,
                            y_grouped=grouped_out and gates is None, blocks=blocks)
        if gates is not None:
            n_tok, n_out = plan.num_tokens, y.shape[1]
            # out[t] = sum_j g[t, j] * y[t*k + j]: y is token-major, so this is one batched [1, k] x [k, out].
            out = torch.bmm(gates.to(y.dtype).reshape(n_tok, 1, k), y.view(n_tok, k, n_out)).view(n_tok, n_out)
        else:
            out = y
        ctx.save_for_backward(x, weight, gates)
        ctx.plan, ctx.fan_out, ctx.blocks = plan, fan_out, blocks
        ctx.grouped_in, ctx.grouped_out = grouped_in, grouped_out
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        x, weight, gates = ctx.saved_tensors
        plan, fan_out, grouped_in, blocks = ctx.plan, ctx.fan_out, ctx.grouped_in, ctx.blocks
        k = plan.top_k
        need_x, need_w, need_g = ctx.needs_input_grad[:3]
        has_g = gates is not None
        grad_out = grad_out.to(x.dtype)
        # Where pair p's output-grad row lives: [N, out] row p // k (gated), grouped row m, or token-major row p.
        dy_grouped = ctx.grouped_out and not has_g
        dy_div = k if has_g else 1
        dx = dw = dg = None
        if need_x or (has_g and need_g):
            # Un-gated input grads dY_row(p) · W_eᵀ, written where x's rows live (grouped or token-major pairs).
            dx_p = scatter2scatter(grad_out, weight.transpose(1, 2), plan, x_grouped=dy_grouped, x_div=dy_div,
                                   y_grouped=grouped_in, blocks=blocks)
            if has_g:
                if grouped_in:
                    g_rows = gates.reshape(-1).index_select(0, plan.sorted_scattered_idxs)  # gate of grouped row m
                else:
                    g_rows = gates.reshape(-1)  # token-major pair order
                if need_g:
                    # dg_p = <dY_t W_eᵀ, x_p> (fp32+ for the row dot).
                    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
                    if grouped_in:
                        dg_s = (dx_p.to(acc) * x.to(acc)).sum(-1)
                        dg = dg_s.index_select(0, plan.scattered_to_sorted)
                    else:
                        m, d_in = x.shape
                        dg = (dx_p.to(acc).view(m, fan_out, d_in) * x.to(acc).reshape(m, 1, d_in)).sum(-1)
                    dg = dg.view(plan.num_tokens, k).to(gates.dtype)
                if need_x:
                    dx_p = dx_p.mul_(g_rows.to(dx_p.dtype).unsqueeze(1))
            if need_x:
                if grouped_in or fan_out == 1:
                    dx = dx_p
                else:  # pairs p = r*fan_out + i all read x row r (token-major): sum them
                    dx = dx_p.view(x.shape[0], fan_out, x.shape[1]).sum(1)
        if need_w:
            dw = expert_wgrad(x, grad_out, plan, x_grouped=grouped_in, x_div=fan_out, dy_grouped=dy_grouped,
                              dy_div=dy_div, gates=gates if has_g else None, out_dtype=weight.dtype, blocks=blocks)
        return dx, dw, dg, None, None, None, None, None
