"""Torch implementation of the routed expert linear: index gather -> ``F.grouped_mm`` -> scatter / gate combine.

The dispatcher is :func:`kernels.expert_linear.expert_linear` (shapes and semantics there). Forward and backward
are ``torch.library`` custom ops (traceable by torch.compile / torch.export); the op saves x, weight and gates
only, and the backward is hand-written (dW = grouped Xᵀ·dY, dX = grouped dY·Wᵀ, gates folded into dY rows).
Layouts ``F.grouped_mm`` refuses (fp64, feature dims not a multiple of 16 bytes) use a per-expert loop fallback
that reads the expert counts back to the host. Large CPU grouped GEMMs with several intra-op threads run as one
single-threaded grouped GEMM per thread over a block of experts (:mod:`kernels.expert_threads`).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .backend import tracing
from .checks import check_expert_linear_args
from .expert_threads import threaded_grouped_mm, threaded_grouped_mm_wgrad
from .routing import RoutingPlan

__all__ = ["torch_expert_linear"]

_GROUPED_MM = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)
_GROUPED_MM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def torch_expert_linear(x: Tensor, weight: Tensor, plan: RoutingPlan, fan_out: int, grouped_in: bool = False,
                        grouped_out: bool = False, gates: Optional[Tensor] = None) -> Tensor:
    """The torch path of :func:`kernels.expert_linear.expert_linear` (same arguments, positional; same result).

    Runs as the custom op ``moduleformer::expert_linear`` (with a registered shape function and backward op), so
    torch.compile and torch.export see one opaque node instead of tracing ``F.grouped_mm`` (whose meta kernel
    refuses fp32) or a Python autograd Function; the routing plan enters as its tensors."""
    check_expert_linear_args(x, weight, plan, fan_out, grouped_in, gates)
    return torch.ops.moduleformer.expert_linear(x, weight, gates, *_plan_tensors(plan), plan.num_experts, plan.top_k,
                                                fan_out, grouped_in, grouped_out)


def _plan_tensors(plan: RoutingPlan) -> tuple:
    return (plan.sorted_scattered_idxs, plan.sorted_token_idxs, plan.scattered_to_sorted, plan.expert_offsets_i32,
            plan.expert_counts)


def _plan_of(sorted_scattered_idxs: Tensor, sorted_token_idxs: Tensor, scattered_to_sorted: Tensor,
             expert_offsets_i32: Tensor, expert_counts: Tensor, num_experts: int, top_k: int) -> RoutingPlan:
    """The plan fields this path reads, rebuilt from the op's tensor arguments (the int64 ids/offsets unused)."""
    return RoutingPlan(sorted_expert_idxs=None, sorted_scattered_idxs=sorted_scattered_idxs, expert_offsets=None,
                       expert_counts=expert_counts, scattered_to_sorted=scattered_to_sorted,
                       sorted_token_idxs=sorted_token_idxs, expert_offsets_i32=expert_offsets_i32,
                       num_experts=num_experts, top_k=top_k)


def _gathered_input(x: Tensor, plan: RoutingPlan, fan_out: int, grouped_in: bool) -> Tensor:
    """[P, in] input rows in expert-sorted order."""
    return x.contiguous() if grouped_in else x.index_select(0, _gather_index(plan, fan_out))


@torch.library.custom_op("moduleformer::expert_linear", mutates_args=())
def _expert_linear_op(x: Tensor, weight: Tensor, gates: Optional[Tensor], sorted_scattered_idxs: Tensor,
                      sorted_token_idxs: Tensor, scattered_to_sorted: Tensor, expert_offsets_i32: Tensor,
                      expert_counts: Tensor, num_experts: int, top_k: int, fan_out: int, grouped_in: bool,
                      grouped_out: bool) -> Tensor:
    plan = _plan_of(sorted_scattered_idxs, sorted_token_idxs, scattered_to_sorted, expert_offsets_i32,
                    expert_counts, num_experts, top_k)
    y_s = _grouped_mm(_gathered_input(x, plan, fan_out, grouped_in), weight, plan)  # [P, out], expert-sorted
    if gates is not None:
        g_s = gates.reshape(-1).index_select(0, plan.sorted_scattered_idxs)  # [P] gate of each sorted row
        y_s.mul_(g_s.unsqueeze(1).to(y_s.dtype))
        out = y_s.new_zeros(plan.num_tokens, y_s.shape[1])
        return out.index_add_(0, plan.sorted_token_idxs, y_s)  # combine the k slots of each token
    if grouped_out:
        return y_s
    return y_s.index_select(0, plan.scattered_to_sorted)  # back to token-major order


@_expert_linear_op.register_fake
def _(x, weight, gates, sorted_scattered_idxs, sorted_token_idxs, scattered_to_sorted, expert_offsets_i32,
      expert_counts, num_experts, top_k, fan_out, grouped_in, grouped_out):
    pairs = sorted_scattered_idxs.shape[0]
    rows = pairs // top_k if gates is not None else pairs
    return x.new_empty(rows, weight.shape[2])


@torch.library.custom_op("moduleformer::expert_linear_backward", mutates_args=())
def _expert_linear_backward_op(grad_out: Tensor, x: Tensor, weight: Tensor, gates: Optional[Tensor],
                               sorted_scattered_idxs: Tensor, sorted_token_idxs: Tensor, scattered_to_sorted: Tensor,
                               expert_offsets_i32: Tensor, expert_counts: Tensor, num_experts: int, top_k: int,
                               fan_out: int, grouped_in: bool, grouped_out: bool, need_x: bool, need_w: bool,
                               need_g: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(dx, dw, dgates); an unneeded gradient is an empty tensor. dW = grouped Xᵀ·dY, dX = grouped dY·Wᵀ, with
    the gate folded into dY rows: dgate_p = <dY_t, x_p W_e> = <dY_t W_eᵀ, x_p> reuses the dX GEMM's result."""
    plan = _plan_of(sorted_scattered_idxs, sorted_token_idxs, scattered_to_sorted, expert_offsets_i32,
                    expert_counts, num_experts, top_k)
    x_s = _gathered_input(x, plan, fan_out, grouped_in)  # recomputed: the op saves x, not the [P, in] copy
    has_gates = gates is not None
    g_s = gates.reshape(-1).index_select(0, plan.sorted_scattered_idxs) if has_gates else None
    # Grad rows in expert-sorted order (index_select / contiguous also undo zero-stride expanded grads).
    if has_gates:
        dy_s = grad_out.index_select(0, plan.sorted_token_idxs)  # [P, out], unscaled by gates
    elif grouped_out:
        dy_s = grad_out.contiguous()
    else:
        dy_s = grad_out.index_select(0, plan.sorted_scattered_idxs)
    dx, dw, dg = x.new_empty(0), x.new_empty(0), x.new_empty(0)  # distinct: outputs may not alias
    if need_x or (need_g and has_gates):
        dx_s = _grouped_mm(dy_s, weight.transpose(1, 2), plan)  # [P, in] = dY_t W_eᵀ (unscaled)
        if has_gates:
            if need_g:
                dg_s = torch.bmm(dx_s.unsqueeze(1), x_s.unsqueeze(2)).view(-1)  # [P] = <dY_t, x_p W_e>
                dg = dg_s.index_select(0, plan.scattered_to_sorted).view(plan.num_tokens, plan.top_k).to(gates.dtype)
            dx_s.mul_(g_s.unsqueeze(1).to(dx_s.dtype))
        if need_x:
            dx = _ungroup_input_grad(dx_s, plan, fan_out, grouped_in, x.shape[0])
    if need_w:
        if has_gates:
            dy_s = dy_s * g_s.unsqueeze(1).to(dy_s.dtype)
        dw = _grouped_mm_wgrad(x_s, dy_s, plan, weight)
    return dx.contiguous(), dw.contiguous(), dg.contiguous()


@_expert_linear_backward_op.register_fake
def _(grad_out, x, weight, gates, sorted_scattered_idxs, sorted_token_idxs, scattered_to_sorted, expert_offsets_i32,
      expert_counts, num_experts, top_k, fan_out, grouped_in, grouped_out, need_x, need_w, need_g):
    dx = x.new_empty(x.shape) if need_x else x.new_empty(0)  # contiguous, as the real op returns them
    dw = weight.new_empty(weight.shape) if need_w else x.new_empty(0)
    dg = gates.new_empty(gates.shape) if need_g and gates is not None else x.new_empty(0)
    return dx, dw, dg


def _setup_context(ctx, inputs, output):
    x, weight, gates = inputs[:3]
    ctx.save_for_backward(x, weight, gates, *inputs[3:8])
    ctx.static = inputs[8:]


def _backward(ctx, grad_out):
    x, weight, gates, *plan_tensors = ctx.saved_tensors
    need_x, need_w, need_g = ctx.needs_input_grad[:3]
    dx, dw, dg = torch.ops.moduleformer.expert_linear_backward(grad_out, x, weight, gates, *plan_tensors,
                                                               *ctx.static, need_x, need_w,
                                                               need_g and gates is not None)
    return (dx if need_x else None, dw if need_w else None, dg if need_g and gates is not None else None,
            *([None] * 10))


_expert_linear_op.register_autograd(_backward, setup_context=_setup_context)


def _gather_index(plan: RoutingPlan, fan_out: int) -> Tensor:
    """Row of x read at each grouped position: pair p reads row p // fan_out."""
    if fan_out == plan.top_k:
        return plan.sorted_token_idxs
    if fan_out == 1:
        return plan.sorted_scattered_idxs
    return torch.div(plan.sorted_scattered_idxs, fan_out, rounding_mode="floor")


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
        out = threaded_grouped_mm(_GROUPED_MM, a_ok, b_ok, plan.expert_offsets_i32)  # CPU, large: experts / thread
        return out if out is not None else _GROUPED_MM(a_ok, b_ok, offs=plan.expert_offsets_i32)
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
        dw = threaded_grouped_mm_wgrad(_GROUPED_MM, a_ok, b_ok, plan.expert_offsets_i32, plan.num_experts)
        if dw is None:
            dw = _GROUPED_MM(a_ok, b_ok, offs=plan.expert_offsets_i32)
    else:
        dw = x_s.new_zeros(plan.num_experts, x_s.shape[1], dy_s.shape[1])
        start = 0
        for e, count in enumerate(plan.expert_counts.tolist()):  # fallback only: host sync
            if count:
                torch.mm(x_s[start : start + count].t(), dy_s[start : start + count], out=dw[e])
            start += count
    return dw.to(weight.dtype)
