"""Mixture-of-attention-heads (MoA): routed query/output experts around shared-K/V stick-breaking attention."""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers.cache_utils import Cache

from .configuration import ModuleFormerConfig
from .kernels.backend import KernelCache
from .kernels.stick_breaking import stick_breaking_kernel
from .moe import MoE


def stick_breaking_weights(q: Tensor, k: Tensor, attention_mask: Optional[Tensor] = None) -> Tensor:
    """Explicit stick-breaking attention weights ``[B, K, H, T, S]`` (for ``output_attentions`` only).

    ``A_ij = sigmoid(l_ij) * prod_{j<m<=i} (1 - sigmoid(l_im))`` in log space, fp32 (fp64 for fp64 inputs).
    Args: q ``[B, T, K, H, D]``, k ``[B, S, H, D]``, attention_mask ``[B, S]`` of 0/1 or None.
    """
    length, context = q.shape[1], k.shape[1]
    dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    logits = torch.einsum("btkhd,bshd->bkhts", q.to(dtype), k.to(dtype)) / math.sqrt(q.shape[-1])
    rows = torch.arange(length, device=q.device).unsqueeze(1) + (context - length)
    visible = torch.arange(context, device=q.device).unsqueeze(0) <= rows  # [T, S], diagonal included
    if attention_mask is not None:
        visible = visible & attention_mask.bool()[:, None, None, None, :]
    log_not_z = torch.where(visible, F.logsigmoid(-logits), 0.0)
    # Inclusive reverse cumsum over keys: sum_{j<=m<=i} log(1 - z_im); log A = l + that.
    suffix = log_not_z.flip(-1).cumsum(-1).flip(-1)
    return torch.where(visible, (logits + suffix).exp(), 0.0)


def check_mask_covers(attention_mask: Optional[Tensor], batch: int, context: int) -> None:
    """Raise unless ``attention_mask`` is None or ``[batch, context]`` (context = cached + new positions)."""
    if attention_mask is not None and attention_mask.shape != (batch, context):
        raise ValueError(
            f"attention_mask has shape {tuple(attention_mask.shape)} but the layer attends over {context} "
            f"positions (cached + new) for batch {batch}: pass a [batch, past + new] mask covering every position."
        )


class ModuleFormerAttention(nn.Module):
    """ModuleFormer's MoA layer (IBM's parameter names: ``q_proj`` MoE, shared ``k_proj`` / ``v_proj`` with bias).

    Per token, ``k_att`` query experts each produce ``n_head`` query heads; head h of every selected expert attends to
    the shared K/V head h with stick-breaking attention; each expert's output projection maps back, gate-weighted.
    """

    def __init__(self, config: ModuleFormerConfig, layer_idx: int = 0) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head = config.n_head
        self.top_k = config.k_att
        self.att_hidden = config.att_hidden
        self.head_size = config.att_hidden // config.n_head
        self.kernel_backend = config.kernel_backend
        self.q_proj = MoE(
            input_size=config.n_embd,
            head_size=config.att_hidden,
            num_experts=config.att_experts_at(layer_idx),
            top_k=config.k_att,
            bias=False,
            gating_dropout=config.moe_pdrop,
            sample_topk=config.sample_topk,
            gating_size=config.gating_size,
            aux_loss=config.aux_loss_type,
            gate_type=config.gate_type,
            kernel_backend=config.kernel_backend,
        )
        if config.att_hidden == config.n_embd and config.n_head == 1:
            self.k_proj = nn.Identity()
            self.v_proj = nn.Identity()
        else:
            self.k_proj = nn.Linear(config.n_embd, config.att_hidden)
            self.v_proj = nn.Linear(config.n_embd, config.att_hidden)

    @property
    def kernel_backend(self) -> str:
        """The stick-breaking kernel backend name (resolved once per device; setting it drops the resolved ones)."""
        return self._attention_kernel.backend

    @kernel_backend.setter
    def kernel_backend(self, name: str) -> None:
        if "_attention_kernel" in self.__dict__:
            self._attention_kernel.backend = name
        else:
            self._attention_kernel = KernelCache(stick_breaking_kernel, name)

    def forward(
        self,
        hidden_states: Tensor,
        attention_mask: Optional[Tensor] = None,
        cache: Optional[Cache] = None,
        compute_aux: bool = True,
        output_attentions: bool = False,
    ) -> tuple[Tensor, Optional[Tensor], Tensor, Optional[Tensor]]:
        """Attend from the T new tokens to the cached and new keys.

        Args:
            hidden_states: ``[B, T, n_embd]`` (already layer-normed).
            attention_mask: ``[B, S]`` 0/1 over all S = past + T positions, or None.
            cache: a transformers ``Cache``; the shared K/V are stored in the standard layout
                ``[B, n_head, S, head_size]`` (one KV head per query head of an expert) and updated in place.
            output_attentions: compute the stick-breaking weights explicitly and the output from them (the eager
                path: O(B*k*H*T*S) memory), so the returned weights are on the autograd path.
        Returns:
            ``(output [B, T, n_embd], aux_loss or None, router_logits [B*T, E], weights or None)`` with weights
            ``[B, k_att * n_head, T, S]`` float32: row ``j * n_head + h`` is head h of the token's j-th selected expert.
        """
        bsz, length, _ = hidden_states.shape
        q, aux, routing, plan = self.q_proj.map(hidden_states, compute_aux)  # (B, T, k, att_hidden)
        k = self.k_proj(hidden_states).view(bsz, length, self.n_head, self.head_size).transpose(1, 2)  # (B, nh, T, hs)
        v = self.v_proj(hidden_states).view(bsz, length, self.n_head, self.head_size).transpose(1, 2)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)  # (B, nh, S, hs)
        context = k.shape[2]
        check_mask_covers(attention_mask, bsz, context)
        q = q.view(bsz, length, self.top_k, self.n_head, self.head_size)  # (B, T, k, nh, hs)
        k, v = k.transpose(1, 2), v.transpose(1, 2)  # (B, S, nh, hs) views: the kernels read strides
        weights = None
        if output_attentions:
            # The returned 4-D tensor itself feeds the output, so gradients reach it (attribution methods).
            weights = stick_breaking_weights(q, k, attention_mask).reshape(bsz, -1, length, context)  # fp32
            y = torch.einsum("bkhts,bshd->btkhd", weights.view(bsz, self.top_k, self.n_head, length, context),
                             v.to(weights.dtype))
        else:
            y = self._attention_kernel(q.device)(q, k, v, attention_mask)  # (B, T, k, nh, hs)
        y = y.reshape(bsz, length, self.top_k, self.att_hidden).to(hidden_states.dtype)
        out = self.q_proj.reduce(y, routing, plan)
        return out, aux, routing.logits, weights
