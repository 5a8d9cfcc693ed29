"""ModuleFormer's MoE layer: a top-k router plus per-expert linear maps, run through ``moduleformer_exit.kernels``.

The same layer serves the MLP experts (``forward``: expert in -> activation -> expert out, gate-weighted sum) and
the mixture-of-attention query/output projections (``map`` then ``reduce``). Unlike IBM's stateful ``map``/``reduce``
pair, the routing is returned by ``map`` and passed to ``reduce`` explicitly.

The expert kernel is resolved once per device (:class:`kernels.backend.KernelCache`), not per call. At inference
with at most ``FEW_TOKENS`` tokens (decode), the layer skips the routing plan and multiplies by the selected
experts' weights directly (:mod:`kernels.few_token_experts`); the result equals the general path's.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch
from torch import Tensor, nn

from .gates import Routing, TopKGating
from .kernels import RoutingPlan, plan_routing
from .kernels.backend import KernelCache
from .kernels.expert_linear import expert_linear_kernel
from .kernels.few_token_experts import FEW_TOKENS, few_token_map, few_token_reduce


class ParallelExperts(nn.Module):
    """``num_experts`` linear maps stored as one ``weight`` ``[E, input_size, output_size]`` (applied as ``x @ W[e]``).

    Layout and initialisation (U(-1/in, 1/in)) match IBM's checkpoints, so their tensors load without transposes.
    """

    def __init__(self, num_experts: int, input_size: int, output_size: int, bias: bool = False) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.input_size = input_size
        self.output_size = output_size
        self.weight = nn.Parameter(torch.empty(num_experts, input_size, output_size))
        self.bias = nn.Parameter(torch.zeros(num_experts, output_size)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """IBM's init: weight U(-1/in, 1/in); bias U(-1/sqrt(in), 1/sqrt(in))."""
        nn.init.uniform_(self.weight, -1.0 / self.input_size, 1.0 / self.input_size)
        if self.bias is not None:
            bound = 1.0 / math.sqrt(self.input_size)
            nn.init.uniform_(self.bias, -bound, bound)

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, input_size={self.input_size}, output_size={self.output_size}"


class MoE(nn.Module):
    """Sparsely gated mixture of experts (IBM's ``MoE``: same constructor arguments and parameter names).

    ``experts``: ``[E, input_size, head_size]``; ``output_experts``: ``[E, hidden_size, input_size]``
    (``hidden_size`` defaults to ``head_size``); ``gate``: :class:`TopKGating`.
    """

    def __init__(
        self,
        input_size: int,
        head_size: int,
        num_experts: int,
        top_k: int,
        bias: bool = False,
        activation: Optional[Callable[[Tensor], Tensor]] = None,
        acc_aux_loss: bool = False,
        hidden_size: Optional[int] = None,
        gating_dropout: float = 0.0,
        sample_topk: int = 0,
        gating_size: int = 256,
        aux_loss: str = "mi",
        gate_type: str = "mlp",
        kernel_backend: str = "auto",
    ) -> None:
        super().__init__()
        if acc_aux_loss:
            raise ValueError(
                "acc_aux_loss=True (accumulating aux statistics across calls) is not supported: the aux loss is "
                "returned by every call; sum it yourself if you need an accumulated value."
            )
        self.num_experts = num_experts
        self.input_size = input_size
        self.head_size = head_size
        self.top_k = top_k
        self.activation = activation
        self.kernel_backend = kernel_backend
        self.experts = ParallelExperts(num_experts, input_size, head_size, bias)
        self.output_experts = ParallelExperts(num_experts, hidden_size or head_size, input_size, bias)
        self.gate = TopKGating(
            input_size=input_size,
            num_experts=num_experts,
            top_k=top_k,
            dropout=gating_dropout,
            hidden_size=gating_size,
            sample_topk=sample_topk,
            aux_loss=aux_loss,
            gate_type=gate_type,
        )

    @property
    def kernel_backend(self) -> str:
        """The expert kernel backend name; setting it drops the implementations resolved so far."""
        return self._expert_kernel.backend

    @kernel_backend.setter
    def kernel_backend(self, name: str) -> None:
        if "_expert_kernel" in self.__dict__:
            self._expert_kernel.backend = name
        else:
            self._expert_kernel = KernelCache(expert_linear_kernel, name)

    def extra_repr(self) -> str:
        return f"k={self.top_k}, backend={self.kernel_backend}"

    def _few_tokens(self, x: Tensor) -> bool:
        """Whether ``x`` ``[N, in]`` takes the plan-free few-token path: N <= FEW_TOKENS and no gradient needed."""
        if x.shape[0] > FEW_TOKENS:
            return False
        return not (torch.is_grad_enabled() and (x.requires_grad or self.experts.weight.requires_grad
                                                 or self.output_experts.weight.requires_grad))

    def route(self, x: Tensor, compute_aux: bool = True,
              plan: bool = True) -> tuple[Routing, Optional[RoutingPlan], Optional[Tensor]]:
        """Route tokens ``x`` ``[N, input_size]``: the router decision, its sorted dispatch plan (None if ``plan``
        is False), and the aux loss (``None`` when ``compute_aux`` is False)."""
        routing = self.gate(x)
        dispatch = plan_routing(routing.top_k_indices, self.num_experts) if plan else None
        aux = self.gate.aux_loss_of(routing) if compute_aux else None
        return routing, dispatch, aux

    def _gates(self, routing: Routing, dtype: torch.dtype) -> Tensor:
        return routing.top_k_gates.to(dtype)

    def _add_output_bias(self, y: Tensor, routing: Routing) -> Tensor:
        # y += sum_j g_j * b_out[e_j]  (ModuleFormer itself has no expert biases; kept for MoE(bias=True) users).
        bias = self.output_experts.bias[routing.top_k_indices]  # [N, k, out]
        return y + (self._gates(routing, y.dtype).unsqueeze(-1) * bias).sum(1)

    def forward(self, x: Tensor, compute_aux: bool = True, return_routing: bool = False) -> tuple:
        """MLP experts: ``y_t = sum_j g_tj * act(x_t W_in[e_tj]) W_out[e_tj]``.

        Args:
            x: ``[B, T, input_size]``.
            compute_aux: compute the aux loss (skip it in inference).
            return_routing: also return the :class:`Routing` (router logits, selection) as a third element.
        Returns:
            ``(y [B, T, input_size], aux_loss or None)`` (as IBM's ``MoE.forward``), plus the routing if asked.
        """
        bsz, length, width = x.shape
        flat = x.reshape(-1, width)
        few = self._few_tokens(flat)
        routing, plan, aux = self.route(flat, compute_aux, plan=not few)
        if few:
            h = few_token_map(flat, self.experts.weight, routing.top_k_indices)  # [N, k, head_size]
            if self.experts.bias is not None:
                h = h + self.experts.bias[routing.top_k_indices]
            if self.activation is not None:
                h = self.activation(h)
            y = few_token_reduce(h, self.output_experts.weight, routing.top_k_indices,
                                 self._gates(routing, h.dtype))
        else:
            linear = self._expert_kernel(flat.device)
            h = linear(flat, self.experts.weight, plan, self.top_k, False, True)  # [N*k, head_size] grouped
            if self.experts.bias is not None:
                h = h + self.experts.bias[plan.sorted_expert_idxs]
            if self.activation is not None:
                h = self.activation(h)
            y = linear(h, self.output_experts.weight, plan, 1, True, False, self._gates(routing, h.dtype))
        if self.output_experts.bias is not None:
            y = self._add_output_bias(y, routing)
        y = y.view(bsz, length, self.input_size)
        return (y, aux, routing) if return_routing else (y, aux)

    def map(self, x: Tensor, compute_aux: bool = True) -> tuple[Tensor, Optional[Tensor], Routing, RoutingPlan]:
        """Attention-expert queries: ``q_tj = x_t W_in[e_tj]`` for each of the k selected experts.

        Args:
            x: ``[B, T, input_size]``.
        Returns:
            ``(q [B, T, k, head_size], aux_loss or None, routing, plan)``; pass routing and plan to :meth:`reduce`.
            ``plan`` is None on the few-token inference path (no routing plan is built).
        """
        bsz, length, width = x.shape
        flat = x.reshape(-1, width)
        few = self._few_tokens(flat)
        routing, plan, aux = self.route(flat, compute_aux, plan=not few)
        if few:
            q = few_token_map(flat, self.experts.weight, routing.top_k_indices).flatten(0, 1)  # [N*k, head_size]
        else:
            q = self._expert_kernel(flat.device)(flat, self.experts.weight, plan, self.top_k)
        if self.experts.bias is not None:
            q = q + self.experts.bias[routing.top_k_indices.flatten()]
        return q.view(bsz, length, self.top_k, self.head_size), aux, routing, plan

    def reduce(self, x: Tensor, routing: Routing, plan: Optional[RoutingPlan]) -> Tensor:
        """Attention-expert outputs: ``y_t = sum_j g_tj * x_tj W_out[e_tj]``.

        Args:
            x: ``[B, T, k, hidden]`` per-slot inputs (e.g. attention outputs), routed as by :meth:`map`.
        Returns:
            ``[B, T, input_size]``.
        """
        bsz, length, k, hidden = x.shape
        gates = self._gates(routing, x.dtype)
        if plan is None:  # few-token path of map()
            y = few_token_reduce(x.reshape(-1, k, hidden), self.output_experts.weight, routing.top_k_indices, gates)
        else:
            y = self._expert_kernel(x.device)(x.reshape(-1, hidden), self.output_experts.weight, plan, 1, False,
                                              False, gates)
        if self.output_experts.bias is not None:
            y = self._add_output_bias(y, routing)
        return y.view(bsz, length, self.input_size)
