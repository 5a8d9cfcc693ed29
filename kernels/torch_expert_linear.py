"""Torch implementation of the routed expert linear: index gather -> ``F.grouped_mm`` -> scatter / gate combine.

The dispatcher is :func:`kernels.expert_linear.expert_linear` (shapes and semantics there). Forward keeps only the
grouped input; the backward is hand-written (dW = grouped Xᵀ·dY, dX = grouped dY·Wᵀ, gates folded into dY rows).
Layouts ``F.grouped_mm`` refuses (fp64, feature dims not a multiple of 16 bytes) use a per-expert loop fallback
that reads the expert counts back to the host.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .backend import tracing
from .checks import check_expert_linear_args
from .routing import RoutingPlan

__all__ = ["torch_expert_linear"]

_GROUPED_MM = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)
_GROUPED_MM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def torch_expert_linear(x: Tensor, weight: Tensor, plan: RoutingPlan, fan_out: int, grouped_in: bool = False,
                        grouped_out: bool = False, gates: Optional[Tensor] = None) -> Tensor:
    """The torch path of :func:`kernels.expert_linear.expert_linear` (same arguments, positional; same result)."""
    check_expert_linear_args(x, weight, plan, fan_out, grouped_in, gates)
    return _ExpertLinear.apply(x, weight, gates, plan, fan_out, grouped_in, grouped_out)


def _gather_index(plan: RoutingPlan, fan_out: int) -> Tensor:
    """Row of x read at each grouped position: pair p reads row p // fan_out."""
    if fan_out == plan.top_k:
        return plan.sorted_token_idxs
    if fan_out == 1:
        return plan.sorted_scattered_idxs
    return torch.div(plan.sorted_scattered_idxs, fan_out, rounding_mode="floor")


class _ExpertLinear(torch.autograd.Function):
    """Autograd for the torch path. Forward keeps only the grouped input (and gates); backward is
    dW = grouped Xᵀ·dY, dX = grouped dY·Wᵀ, with the gate folded into dY rows (no saved output needed:
    dgate_p = <dY_t, x_p W_e> = <dY_t W_eᵀ, x_p>, which reuses the dX GEMM's result)."""

    @staticmethod
    def forward(ctx, x, weight, gates, plan, fan_out, grouped_in, grouped_out):
        if grouped_in:
            x_s = x.contiguous()
        else:
            x_s = x.index_select(0, _gather_index(plan, fan_out))  # [P, in], expert-sorted
        y_s = _grouped_mm(x_s, weight, plan)  # [P, out], expert-sorted
        g_s = None
        if gates is not None:
            g_s = gates.reshape(-1).index_select(0, plan.sorted_scattered_idxs)  # [P] gate of each sorted row
            y_s.mul_(g_s.unsqueeze(1).to(y_s.dtype))
            out = y_s.new_zeros(plan.num_tokens, y_s.shape[1])
            out.index_add_(0, plan.sorted_token_idxs, y_s)  # combine the k slots of each token
        elif grouped_out:
            out = y_s
        else:
            out = y_s.index_select(0, plan.scattered_to_sorted)  # back to token-major order
        ctx.save_for_backward(x_s, weight, g_s)
        ctx.plan, ctx.fan_out, ctx.grouped_in, ctx.grouped_out = plan, fan_out, grouped_in, grouped_out
        ctx.x_rows, ctx.has_gates = x.shape[0], gates is not None
        ctx.gates_dtype = gates.dtype if gates is not None else None
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        x_s, weight, g_s = ctx.saved_tensors
        plan = ctx.plan
        need_x, need_w, need_g = ctx.needs_input_grad[:3]
        # Grad rows in expert-sorted order (index_select / contiguous also undo zero-stride expanded grads).
        if ctx.has_gates:
            dy_s = grad_out.index_select(0, plan.sorted_token_idxs)  # [P, out], unscaled by gates
        elif ctx.grouped_out:
            dy_s = grad_out.contiguous()
        else:
            dy_s = grad_out.index_select(0, plan.sorted_scattered_idxs)
        dx = dw = dg = None
        if need_x or need_g:
            dx_s = _grouped_mm(dy_s, weight.transpose(1, 2), plan)  # [P, in] = dY_t W_eᵀ (unscaled)
            if ctx.has_gates:
                if need_g:
                    dg_s = torch.bmm(dx_s.unsqueeze(1), x_s.unsqueeze(2)).view(-1)  # [P] = <dY_t, x_p W_e>
                    dg = dg_s.index_select(0, plan.scattered_to_sorted).view(plan.num_tokens, plan.top_k)
                    dg = dg.to(ctx.gates_dtype)
                dx_s.mul_(g_s.unsqueeze(1).to(dx_s.dtype))
            if need_x:
                dx = _ungroup_input_grad(dx_s, plan, ctx.fan_out, ctx.grouped_in, ctx.x_rows)
        if need_w:
            if ctx.has_gates:
                dy_s.mul_(g_s.unsqueeze(1).to(dy_s.dtype))  # dy_s is our own gathered copy
            dw = _grouped_mm_wgrad(x_s, dy_s, plan, weight)
        return dx, dw, dg, None, None, None, None


def _ungroup_input_grad(dx_s: Tensor, plan: RoutingPlan, fan_out: int, grouped_in: bool, x_rows: int) -> Tensor:
    """Map grouped-order input grads back to x's layout (summing the fan_out pairs that read one row)."""
    if grouped_in:
        return dx_s
    if fan_out == 1:
        return dx_s.index_select(0, plan.scattered_to_sorted)
    dx = dx_s.new_zeros(x_rows, dx_s.shape[1])
    return dx.index_add_(0, _gather_index(plan, fan_out), dx_s)


# ---------------------------------------------------------------------------------------------------------------
# grouped GEMM primitives (F.grouped_mm where it applies, per-expert loop otherwise)
# ---------------------------------------------------------------------------------------------------------------


def _gmm_layout_ok(t: Tensor, check_pointer: bool = True) -> bool:
    """Whether F.grouped_mm accepts this 2D/3D operand as is: 16-byte aligned data pointer, unit stride in one of
    the last two dims and a 16-byte multiple for the other."""
    if t.dtype not in _GROUPED_MM_DTYPES or (check_pointer and t.data_ptr() % 16 != 0):
        return False
    align = 16 // t.element_size()
    s, n = t.stride(), t.shape
    if s[-2] == 1 and s[-1] >= max(1, n[-2]):
        return s[-1] % align == 0
    if s[-1] == 1 and s[-2] >= max(1, n[-1]):
        return s[-2] % align == 0
    return False


def _gmm_operand(t: Tensor) -> Optional[Tensor]:
    """t itself if grouped_mm takes it, a contiguous copy if that fixes it, else None (use the loop)."""
    if _GROUPED_MM is None or t.device.type not in ("cpu", "cuda"):
        return None
    if tracing():  # no data pointer while tracing: a fresh (hence aligned) contiguous copy always qualifies
        c = t.contiguous().clone() if t.is_contiguous() else t.contiguous()
        return c if _gmm_layout_ok(c, check_pointer=False) else None
    if _gmm_layout_ok(t):
        return t
    c = t.contiguous()
    if c is not t and _gmm_layout_ok(c):
        return c
    return None


def _grouped_mm(a: Tensor, b: Tensor, plan: RoutingPlan) -> Tensor:
    """``[P, K] x [E, K, N] -> [P, N]``: rows of expert e (grouped order) times ``b[e]``."""
    a_ok, b_ok = _gmm_operand(a), _gmm_operand(b)
    if a_ok is not None and b_ok is not None and a.dtype == b.dtype:
        return _GROUPED_MM(a_ok, b_ok, offs=plan.expert_offsets_i32)
    out = a.new_empty(a.shape[0], b.shape[2])
    start = 0
    for e, count in enumerate(plan.expert_counts.tolist()):  # fallback only (fp64 / odd dims): host sync
        if count:
            torch.mm(a[start : start + count], b[e], out=out[start : start + count])
        start += count
    return out


def _grouped_mm_wgrad(x_s: Tensor, dy_s: Tensor, plan: RoutingPlan, weight: Tensor) -> Tensor:
    """``[P, K], [P, N] -> [E, K, N]``: per-expert ``x_sᵀ dy_s`` over that expert's rows (zeros if it has none).
    grouped_mm's 2D x 2D form splits the contraction dim by ``offs``, which is exactly this."""
    a_ok, b_ok = _gmm_operand(x_s.t()), _gmm_operand(dy_s)
    if a_ok is not None and b_ok is not None and x_s.dtype == dy_s.dtype:
        dw = _GROUPED_MM(a_ok, b_ok, offs=plan.expert_offsets_i32)
    else:
        dw = x_s.new_zeros(plan.num_experts, x_s.shape[1], dy_s.shape[1])
        start = 0
        for e, count in enumerate(plan.expert_counts.tolist()):  # fallback only: host sync
            if count:
                torch.mm(x_s[start : start + count].t(), dy_s[start : start + count], out=dw[e])
            start += count
    return dw.to(weight.dtype)
