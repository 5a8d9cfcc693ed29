"""Expert parallelism for ModuleFormer's MoE layers: a rank keeps ``E / ep_size`` experts of every layer, and the
rows routed to an expert travel to the rank that holds it and back (uneven ``all_to_all_single``).

What stays and what moves:

- Routing is ModuleFormer's own: every rank runs the layer's (replicated) gate on its own tokens, top-k, gates not
  renormalised, aux loss from its own call. No capacity limit, no dropped token: the per-expert counts of the
  routing plan are the all-to-all split sizes (uneven; an expert with no row sends and receives nothing).
- MLP experts (``mlpf``): one round trip. A token's k rows go to the ranks of its k experts, each computes
  ``act(x W_in[e]) W_out[e]`` for the rows it received (grouped GEMM over its local experts), the results come back
  and the origin rank combines them with its gates: ``y_t = sum_j g_tj out_tj``.
- Attention experts (``attn.q_proj``): only their query/output projections are experts; keys and values are shared
  and stay with the sequence. So queries are made remotely and attention runs locally: ``map`` sends the token
  rows out and gets ``q_tj = x_t W_q[e_tj]`` back; ``reduce`` sends the attention outputs ``o_tj`` out and gets
  ``o_tj W_o[e_tj]`` back, combined with the gates at the origin. ``reduce`` reuses ``map``'s split sizes.
- Gates are applied at the origin, so the router's gradient never leaves its rank; expert weight gradients gather
  every rank's rows through the all-to-all's backward (the same all-to-all with the split sizes swapped).

Global expert ``e`` lives on expert-parallel rank ``e // E_local`` as local expert ``e % E_local``: gathering the
shards in rank order restores the single-process layout (:func:`gather_expert_state_dict`).

This module needs only ``torch.distributed`` (the process group comes from the caller: DeepSpeed's expert-parallel
group in training, see ``training/expert_parallel.py``); it never imports DeepSpeed.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .gates import Routing
from .kernels import RoutingPlan, plan_routing
from .kernels.backend import KernelCache
from .kernels.expert_linear import expert_linear_kernel
from .moe import MoE, ParallelExperts

__all__ = ["ExpertParallelMoE", "ExpertExchange", "all_to_all", "shard_experts", "expert_parallel_layers",
           "gather_expert_state_dict", "is_expert_parallel"]


# torch >= 2.13 renamed all_gather_into_tensor (the old name warns); same signature
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


class _AllToAll(torch.autograd.Function):
    """Differentiable uneven ``all_to_all_single`` along dim 0; the backward sends gradients back the same way."""

    @staticmethod
    def forward(ctx, x: Tensor, out_splits: list[int], in_splits: list[int], group) -> Tensor:
        ctx.out_splits, ctx.in_splits, ctx.group = out_splits, in_splits, group
        out = x.new_empty((sum(out_splits), *x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        out = grad.new_empty((sum(ctx.in_splits), *grad.shape[1:]))
        dist.all_to_all_single(out, grad.contiguous(), ctx.in_splits, ctx.out_splits, group=ctx.group)
        return out, None, None, None


def all_to_all(x: Tensor, out_splits: list[int], in_splits: list[int], group) -> Tensor:
    """Send rows ``x[sum(in_splits[:r]) : sum(in_splits[:r+1])]`` to rank r of ``group``; returns the
    ``[sum(out_splits), ...]`` rows received, ordered by source rank (``out_splits[r]`` from rank r).
    Differentiable (the gradient takes the way back)."""
    return _AllToAll.apply(x, list(out_splits), list(in_splits), group)


@dataclass
class ExpertExchange:
    """Who sends what to whom for one MoE call (built once per call, shared by ``map`` and ``reduce``).

    - ``plan``: this rank's routing plan over all E experts (pairs sorted by global expert; the rows for EP rank r
      are the r-th contiguous block, since its experts are a contiguous id range).
    - ``send_splits`` / ``recv_splits``: rows sent to / received from each EP rank.
    - ``local_plan``: plan of the received rows over the E_local local experts (top-1; rows in received order:
      by source rank, then by local expert).
    """

    plan: RoutingPlan
    send_splits: list[int]
    recv_splits: list[int]
    local_plan: RoutingPlan


def exchange_for(plan: RoutingPlan, ep_size: int, group) -> ExpertExchange:
    """Swap the per-expert row counts with the other EP ranks and plan the received rows (one small all-to-all of
    E int64 counts; reading the split sizes back is the host sync every uneven all-to-all needs)."""
    local = plan.num_experts // ep_size
    counts = plan.expert_counts  # [E] = [ep, local] blocks, block r goes to rank r
    received = torch.empty_like(counts)
    dist.all_to_all_single(received, counts.contiguous(), group=group)  # received[r*local + l]: rank r's rows for l
    send = counts.view(ep_size, local).sum(1).tolist()
    recv = received.view(ep_size, local).sum(1).tolist()
    local_ids = torch.arange(local, device=counts.device).repeat(ep_size).repeat_interleave(received)
    return ExpertExchange(plan, send, recv, plan_routing(local_ids.unsqueeze(1), local))


class ExpertParallelMoE(nn.Module):
    """Drop-in for :class:`moduleformer_exit.moe.MoE` (same ``forward`` / ``map`` / ``reduce`` results, same
    parameter names) holding only its expert-parallel rank's ``E / ep_size`` experts.

    Build it with :meth:`from_moe` (or :func:`shard_experts` for a whole model). Every rank of ``group`` must call
    the layer the same number of times (the all-to-alls are collective), as in data-parallel training.
    """

    def __init__(self, moe: MoE, group, ep_size: int, ep_rank: int) -> None:
        super().__init__()
        if moe.experts.bias is not None or moe.output_experts.bias is not None:
            raise ValueError("expert parallelism supports MoE layers without expert biases (ModuleFormer's); this "
                             "layer has bias=True: build it with bias=False or train it with ep_size=1.")
        if moe.num_experts % ep_size:
            raise ValueError(f"a layer with {moe.num_experts} experts cannot be split over ep_size={ep_size} ranks: "
                             f"choose an ep_size that divides every layer's expert count.")
        self.num_experts, self.ep_size, self.ep_rank, self.group = moe.num_experts, ep_size, ep_rank, group
        self.num_local_experts = local = moe.num_experts // ep_size
        self.input_size, self.head_size, self.top_k, self.activation = (moe.input_size, moe.head_size, moe.top_k,
                                                                        moe.activation)
        self.gate = moe.gate  # replicated: a data-parallel parameter like any other
        shard = slice(ep_rank * local, (ep_rank + 1) * local)
        self.experts = self._shard(moe.experts, shard)
        self.output_experts = self._shard(moe.output_experts, shard)
        self._expert_kernel = KernelCache(expert_linear_kernel, moe.kernel_backend)

    @staticmethod
    def _shard(full: ParallelExperts, shard: slice) -> ParallelExperts:
        local = ParallelExperts(0, full.input_size, full.output_size)  # empty init, then this rank's slice
        local.num_experts = shard.stop - shard.start
        local.weight = nn.Parameter(full.weight.detach()[shard].clone(), requires_grad=full.weight.requires_grad)
        return local

    @classmethod
    def from_moe(cls, moe: MoE, group, ep_size: int, ep_rank: int) -> "ExpertParallelMoE":
        """This rank's shard of ``moe`` (experts ``ep_rank * E/ep_size ...``), sharing its gate module."""
        return cls(moe, group, ep_size, ep_rank)

    @property
    def kernel_backend(self) -> str:
        return self._expert_kernel.backend

    @kernel_backend.setter
    def kernel_backend(self, name: str) -> None:
        self._expert_kernel.backend = name

    def extra_repr(self) -> str:
        return (f"k={self.top_k}, experts {self.ep_rank * self.num_local_experts}.."
                f"{(self.ep_rank + 1) * self.num_local_experts - 1} of {self.num_experts} (ep_size={self.ep_size})")

    # ------------------------------------------------------------------------------------------- plumbing
    def _route(self, flat: Tensor, compute_aux: bool) -> tuple[Routing, ExpertExchange, Optional[Tensor]]:
        routing = self.gate(flat)
        plan = plan_routing(routing.top_k_indices, self.num_experts)
        aux = self.gate.aux_loss_of(routing) if compute_aux else None
        return routing, exchange_for(plan, self.ep_size, self.group), aux

    def _send(self, rows: Tensor, ex: ExpertExchange) -> Tensor:
        """``[P, h]`` rows in this rank's expert-sorted order -> ``[R, h]`` rows received for the local experts."""
        return all_to_all(rows, ex.recv_splits, ex.send_splits, self.group)

    def _return(self, rows: Tensor, ex: ExpertExchange) -> Tensor:
        """``[R, h]`` results in received order -> ``[P, h]`` results of this rank's pairs, expert-sorted."""
        return all_to_all(rows, ex.send_splits, ex.recv_splits, self.group)

    def _combine(self, rows: Tensor, routing: Routing, ex: ExpertExchange) -> Tensor:
        """``y_t = sum_j g_tj row_tj`` from expert-sorted ``[P, h]`` rows -> ``[N, h]``."""
        gates = routing.top_k_gates.to(rows.dtype).reshape(-1).index_select(0, ex.plan.sorted_scattered_idxs)
        out = rows.new_zeros(ex.plan.num_tokens, rows.shape[1])
        return out.index_add(0, ex.plan.sorted_token_idxs, rows * gates.unsqueeze(1))

    # ------------------------------------------------------------------------------------------- MoE API
    def forward(self, x: Tensor, compute_aux: bool = True, return_routing: bool = False) -> tuple:
        """MLP experts, as :meth:`MoE.forward`: ``x`` ``[B, T, input_size]`` -> ``(y, aux[, routing])``."""
        bsz, length, width = x.shape
        flat = x.reshape(-1, width)
        routing, ex, aux = self._route(flat, compute_aux)
        linear = self._expert_kernel(flat.device)
        rows = self._send(flat.index_select(0, ex.plan.sorted_token_idxs), ex)  # [R, D] for the local experts
        h = linear(rows, self.experts.weight, ex.local_plan, 1, False, True)  # [R, F] grouped by local expert
        if self.activation is not None:
            h = self.activation(h)
        out = linear(h, self.output_experts.weight, ex.local_plan, 1, True, False)  # [R, D] received order
        y = self._combine(self._return(out, ex), routing, ex).view(bsz, length, self.input_size)
        return (y, aux, routing) if return_routing else (y, aux)

    def map(self, x: Tensor, compute_aux: bool = True) -> tuple[Tensor, Optional[Tensor], Routing, ExpertExchange]:
        """Attention-expert queries, as :meth:`MoE.map`: ``(q [B, T, k, head_size], aux, routing, exchange)``;
        pass routing and exchange to :meth:`reduce`."""
        bsz, length, width = x.shape
        flat = x.reshape(-1, width)
        routing, ex, aux = self._route(flat, compute_aux)
        rows = self._send(flat.index_select(0, ex.plan.sorted_token_idxs), ex)
        q = self._expert_kernel(flat.device)(rows, self.experts.weight, ex.local_plan, 1)  # [R, head] received order
        q = self._return(q, ex).index_select(0, ex.plan.scattered_to_sorted)  # [N*k, head] token-major
        return q.view(bsz, length, self.top_k, self.head_size), aux, routing, ex

    def reduce(self, x: Tensor, routing: Routing, ex: ExpertExchange) -> Tensor:
        """Attention-expert outputs, as :meth:`MoE.reduce`: ``x`` ``[B, T, k, hidden]`` -> ``[B, T, input_size]``."""
        bsz, length, k, hidden = x.shape
        rows = self._send(x.reshape(-1, hidden).index_select(0, ex.plan.sorted_scattered_idxs), ex)
        out = self._expert_kernel(x.device)(rows, self.output_experts.weight, ex.local_plan, 1)  # [R, D]
        return self._combine(self._return(out, ex), routing, ex).view(bsz, length, self.input_size)


# ----------------------------------------------------------------------------------------------- whole models
def shard_experts(model: nn.Module, group, ep_size: int, ep_rank: int) -> list[ExpertParallelMoE]:
    """Replace every :class:`MoE` of ``model`` (attention ``q_proj`` and MLP ``mlpf`` of each block) by its
    expert-parallel shard for ``ep_rank`` of ``group``, in place; returns the new layers.

    Raises ValueError (naming the layer) when a layer's expert count is not a multiple of ``ep_size``."""
    targets = [(name, m) for name, m in model.named_modules() if isinstance(m, MoE)]
    for name, m in targets:
        if m.num_experts % ep_size:
            raise ValueError(f"{name} has {m.num_experts} experts, not a multiple of ep_size={ep_size}: choose an "
                             f"ep_size that divides every layer's attention and MLP expert count.")
    layers = []
    for name, m in targets:
        parent_name, _, attr = name.rpartition(".")
        layer = ExpertParallelMoE.from_moe(m, group, ep_size, ep_rank)
        setattr(model.get_submodule(parent_name) if parent_name else model, attr, layer)
        layers.append(layer)
    return layers


def expert_parallel_layers(model: nn.Module) -> list[tuple[str, ExpertParallelMoE]]:
    """``(module name, layer)`` of every expert-parallel layer of ``model``."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, ExpertParallelMoE)]


def is_expert_parallel(model: nn.Module) -> bool:
    """Whether ``model`` holds expert-parallel layers."""
    return bool(expert_parallel_layers(model))


def local_expert_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """This rank's expert shards ``{state-dict name: [E_local, in, out]}`` (detached; the names of the full model)."""
    state = {}
    for name, layer in expert_parallel_layers(model):
        for sub in ("experts", "output_experts"):
            state[f"{name}.{sub}.weight"] = getattr(layer, sub).weight.detach()
    return state


def gather_expert_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The full model's state dict (every rank of each EP group returns the same): non-expert tensors as they are,
    expert weights all-gathered over their EP group and concatenated in rank order ``[E, in, out]``.
    Collective: every rank must call it."""
    state = {k: v.detach() for k, v in model.state_dict().items()}
    for name, layer in expert_parallel_layers(model):
        for sub in ("experts", "output_experts"):
            w = getattr(layer, sub).weight.detach().contiguous()
            full = w.new_empty((w.shape[0] * layer.ep_size, *w.shape[1:]))
            _all_gather_single(full, w, group=layer.group)
            state[f"{name}.{sub}.weight"] = full
    return state
