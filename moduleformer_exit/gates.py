"""Top-k routers of ModuleFormer's MoE layers (mlp / linear / gmm gates) and their auxiliary losses (mi / switch).

Semantics follow IBM's ``top_k_gating`` exactly: softmax over all experts, top-k gates NOT renormalised, optional
training-time sampling of the last ``sample_topk`` experts, and an aux loss computed from each call's statistics.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class Routing:
    """Routing decision for N tokens of one MoE call.

    Attributes:
        top_k_indices: ``[N, k]`` int64 selected expert ids, in selection order.
        top_k_gates: ``[N, k]`` softmax probabilities of the selected experts (not renormalised).
        logits: ``[N, E]`` router logits (as the gate computed them).
        probs: ``[N, E]`` float32 softmax of ``logits``.
    """

    top_k_indices: Tensor
    top_k_gates: Tensor
    logits: Tensor
    probs: Tensor


def mutual_information_loss(probs: Tensor, logits: Tensor, eps: float = 1e-8) -> Tensor:
    """IBM's ``mi`` aux loss: ``H(e|x) - H(e)`` over the N tokens of one call (minimising it maximises MI).

    Args:
        probs: ``[N, E]`` softmax of ``logits``.
        logits: ``[N, E]`` router logits.
    """
    p_e = probs.mean(0)
    entropy_e = -(p_e * (p_e + eps).log()).sum()
    neg_entropy_e_given_x = (probs * torch.log_softmax(logits, dim=-1)).sum() / probs.size(0)
    return -(neg_entropy_e_given_x + entropy_e)


def switch_loss(probs: Tensor, logits: Tensor, top_k_indices: Tensor, top_k_gates: Tensor) -> Tensor:
    """IBM's non-``mi`` aux loss: Switch load balancing ``E * sum_e P_e f_e`` plus ``0.1 *`` router z-loss.

    Args:
        probs: ``[N, E]`` softmax of ``logits``.
        logits: ``[N, E]`` router logits.
        top_k_indices / top_k_gates: ``[N, k]`` selection; ``f_e`` counts assignments with a positive gate.
    """
    num_experts = probs.size(1)
    assigned = (top_k_gates > 0).to(probs.dtype)
    freq = torch.zeros(num_experts, dtype=probs.dtype, device=probs.device)
    freq = freq.scatter_add(0, top_k_indices.flatten(), assigned.flatten())
    balance = num_experts * (F.normalize(probs.sum(0), p=1, dim=0) * F.normalize(freq, p=1, dim=0)).sum()
    z_loss = torch.logsumexp(logits.float(), dim=-1).pow(2).mean()
    return balance + 0.1 * z_loss


class TopKGating(nn.Module):
    """Router picking ``top_k`` of ``num_experts`` experts per token (IBM's ``top_k_gating``; same parameter names).

    ``gate_type``: ``"mlp"`` (Linear -> GELU -> Dropout -> Linear, hidden ``hidden_size``), ``"linear"``
    (one Linear) or ``"gmm"`` (cosine similarity of a projection to learned centroids, times ``exp(temperature)``).
    """

    def __init__(
        self,
        input_size: int,
        num_experts: int,
        top_k: int,
        dropout: float = 0.0,
        hidden_size: int = 256,
        sample_topk: int = 0,
        aux_loss: str = "mi",
        gate_type: str = "mlp",
    ) -> None:
        super().__init__()
        if not 0 < top_k <= num_experts:
            raise ValueError(f"top_k must be in [1, num_experts={num_experts}], got {top_k}.")
        if not 0 <= sample_topk <= top_k:
            raise ValueError(f"sample_topk must be in [0, top_k={top_k}], got {sample_topk}.")
        if aux_loss not in ("mi", "switch"):
            raise ValueError(f"aux_loss must be 'mi' or 'switch', got {aux_loss!r}.")
        self.input_size = input_size
        self.num_experts = num_experts
        self.top_k = top_k
        self.sample_topk = sample_topk
        self.aux_loss = aux_loss
        self.gate_type = gate_type
        if gate_type == "mlp":
            self.w_gate = nn.Sequential(
                nn.Linear(input_size, hidden_size),
                nn.GELU(),
                nn.Dropout(dropout),
                nn.Linear(hidden_size, num_experts, bias=False),
            )
        elif gate_type == "linear":
            self.w_gate = nn.Sequential(nn.Linear(input_size, num_experts, bias=False))
        elif gate_type == "gmm":
            self.w_gate = nn.Linear(input_size, hidden_size, bias=False)
            self.expert_centroids = nn.Parameter(torch.empty(num_experts, hidden_size))
            self.temperature = nn.Parameter(torch.zeros(1))
            nn.init.normal_(self.expert_centroids)
        else:
            raise ValueError(f"gate_type must be one of 'mlp', 'linear', 'gmm', got {gate_type!r}.")

    def extra_repr(self) -> str:
        return f"k={self.top_k}, num_experts={self.num_experts}, aux_loss={self.aux_loss}, gate_type={self.gate_type}"

    def compute_logits(self, x: Tensor) -> Tensor:
        """Router logits ``[N, E]`` for tokens ``x`` ``[N, input_size]``."""
        if self.gate_type == "gmm":
            z = F.normalize(self.w_gate(x), p=2, dim=-1)
            centroids = F.normalize(self.expert_centroids, p=2, dim=-1)
            return (z @ centroids.t()) * self.temperature.exp()
        return self.w_gate(x)

    @staticmethod
    def routing_probs(logits: Tensor) -> Tensor:
        """``[N, E]`` float32 routing probabilities of router logits (fp32 keeps bf16 routing stable)."""
        return torch.softmax(logits.float(), dim=1)

    def forward(self, x: Tensor) -> Routing:
        """Route tokens ``x`` ``[N, input_size]``; returns a :class:`Routing` with ``[N, k]`` indices and gates."""
        logits = self.compute_logits(x)
        probs = self.routing_probs(logits)
        num_sampled = self.sample_topk if self.training else 0
        if num_sampled > 0:
            # The first k - s experts are the most probable; the last s are drawn without replacement from the rest.
            # Same ops and RNG consumption as IBM's gate, so seeded training runs match the original.
            _, top_indices = probs.topk(self.top_k - num_sampled, dim=1)
            candidates = (probs + 1e-6).scatter(1, top_indices, 0.0)
            sampled = torch.multinomial(candidates, num_sampled)
            top_k_indices = torch.cat([top_indices, sampled], dim=-1)
            top_k_gates = torch.gather(probs, 1, top_k_indices)
        else:
            top_k_gates, top_k_indices = probs.topk(self.top_k, dim=1)
        return Routing(top_k_indices=top_k_indices, top_k_gates=top_k_gates, logits=logits, probs=probs)

    def aux_loss_of(self, routing: Routing) -> Tensor:
        """The auxiliary loss (``mi`` or ``switch``) of one call's routing statistics."""
        if self.aux_loss == "mi":
            return mutual_information_loss(routing.probs, routing.logits.float())
        return switch_loss(routing.probs, routing.logits, routing.top_k_indices, routing.top_k_gates)
