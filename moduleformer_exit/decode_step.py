"""The few-token inference step of a ModuleFormer block (decode): the block's math without its module plumbing.

A batch-1 decode step of the modules runs ~20 module calls and ~110 dispatched tensor ops per block; on a CPU each
costs microseconds that the few-token GEMVs do not hide. :func:`block_decode_step` computes the same block output
from the modules' parameters without the submodule calls and with fewer ops (907 -> 787 dispatched ops per token
for ``configs/moduleformer-25m-active.json``, ``bench --only decode_limit``): LayerNorms, routers and K/V
projections as functional calls, the selected experts' weights read directly (:mod:`kernels.few_token_experts`),
and stick-breaking attention in the KV cache's own head-major layout
(:func:`kernels.torch_stick_breaking.head_major_stick_breaking`: no permuted copies). The results equal the general
path's up to fp32 rounding (tests: <= 1e-6; float64 <= 1e-12).

:func:`decode_step_applies` decides per call. The step is taken only where it is the same computation: CPU tensors
(the expert ids are read on the host), at most ``FEW_TOKENS`` tokens, inference (no gradient, eval mode, no aux
loss, no attention weights asked), the torch attention kernel, expert layers without biases, and every bypassed
module exactly its stock class without hooks or ZeRO-3 partitioning (:mod:`moduleformer_exit.plain_modules`).
Anything else (PEFT adapters, accelerate offloading, user hooks, CUDA, training) runs the modules as usual, and
so does everything while :data:`ENABLED` is False.
"""
from __future__ import annotations

import math
import weakref
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers.cache_utils import Cache

from .attention import ModuleFormerAttention, check_mask_covers
from .gates import TopKGating
from .kernels.backend import tracing
from .kernels.few_token_experts import FEW_TOKENS, few_token_map, few_token_reduce
from .kernels.torch_stick_breaking import head_major_stick_breaking, torch_stick_breaking_attention
from .moe import MoE, ParallelExperts
from .plain_modules import is_stock, no_global_hooks, unhooked

__all__ = ["decode_step_applies", "block_decode_step", "ENABLED"]

ENABLED = True  # False: every block runs its modules (benchmarks compare the two; a switch for debugging)

_GATE_LAYERS = {"mlp": (nn.Linear, nn.GELU, nn.Dropout, nn.Linear), "linear": (nn.Linear,)}


class _Bypassed:
    """The modules a block's step reads instead of calling, found once per block: ``entries`` are
    ``(parent, name, module)`` (parent None = the block itself, so nothing here keeps the block alive), and
    ``ok`` says whether they are the stock classes the step assumes (exact classes, no expert biases, no gmm gate,
    no ZeRO-3 partitioned parameters). Hooks and train mode are not part of it: they are checked on every call."""

    def __init__(self, block: nn.Module) -> None:
        self.entries: list[tuple[Optional[nn.Module], str, nn.Module]] = []
        self.ok = self._walk(block)

    def _add(self, parent: nn.Module, name: str, cls: type, block: nn.Module) -> Optional[nn.Module]:
        module = parent._modules.get(name)
        self.entries.append((None if parent is block else parent, name, module))
        return module if module is not None and is_stock(module, cls) else None  # (never descend into others)

    def _walk(self, block: nn.Module) -> bool:
        attn = self._add(block, "attn", ModuleFormerAttention, block)
        if attn is None or self._add(block, "ln_1", nn.LayerNorm, block) is None \
                or self._add(block, "ln_2", nn.LayerNorm, block) is None:
            return False
        for name in ("k_proj", "v_proj"):
            cls = nn.Linear if isinstance(attn._modules.get(name), nn.Linear) else nn.Identity
            if self._add(attn, name, cls, block) is None:
                return False
        for parent, name in ((attn, "q_proj"), (block, "mlpf")):
            moe = self._add(parent, name, MoE, block)
            if moe is None:
                return False
            for experts in ("experts", "output_experts"):
                layer = self._add(moe, experts, ParallelExperts, block)
                if layer is None or layer.bias is not None:
                    return False
            gate = self._add(moe, "gate", TopKGating, block)
            if gate is None or gate.gate_type not in _GATE_LAYERS:
                return False  # (gmm gates keep their module call)
            seq = self._add(gate, "w_gate", nn.Sequential, block)
            layers = _GATE_LAYERS[gate.gate_type]
            if seq is None or len(seq) != len(layers):
                return False
            if any(self._add(seq, str(index), cls, block) is None for index, cls in enumerate(layers)):
                return False
        return True

    def current(self, block: nn.Module) -> bool:
        """No module was replaced (e.g. by PEFT injecting or merging adapters) since the walk."""
        return all((parent or block)._modules.get(name) is module for parent, name, module in self.entries)


# block -> _Bypassed (re-walked when a module was replaced); weak keys, and the values hold no reference to the block
_BYPASSED: "weakref.WeakKeyDictionary[nn.Module, _Bypassed]" = weakref.WeakKeyDictionary()


def decode_step_applies(block: nn.Module, hidden_states: Tensor, compute_aux: bool, output_attentions: bool) -> bool:
    """Whether :func:`block_decode_step` computes this ``ModuleFormerBlock`` call (``hidden_states`` ``[B, T, d]``)
    exactly as its modules would (see the module docstring for the conditions). Cheap: the structural check is
    cached per block; module identity, hooks and train mode are re-checked on every call."""
    if (not ENABLED or compute_aux or output_attentions or block.training or torch.is_grad_enabled()
            or hidden_states.device.type != "cpu" or hidden_states.shape[0] * hidden_states.shape[1] > FEW_TOKENS
            or tracing() or not no_global_hooks()):
        return False
    bypassed = _BYPASSED.get(block)
    if bypassed is None or not bypassed.current(block):
        bypassed = _BYPASSED[block] = _Bypassed(block)
    # a submodule left in train mode (e.g. MC dropout on the router) must run its forward
    if not bypassed.ok or not all(unhooked(m) and not m.training for _, _, m in bypassed.entries):
        return False
    return block.attn._attention_kernel(hidden_states.device) is torch_stick_breaking_attention


def _layer_norm(x: Tensor, norm: nn.LayerNorm) -> Tensor:
    return F.layer_norm(x, norm.normalized_shape, norm.weight, norm.bias, norm.eps)


def _route(gate: TopKGating, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``x`` ``[N, d]`` -> (top-k ids ``[N, k]``, gates ``[N, k]`` float32, logits ``[N, E]``) as
    :meth:`TopKGating.forward` computes them in eval mode (the dropout is an identity there)."""
    seq = gate.w_gate
    if gate.gate_type == "mlp":
        first, act, _, last = seq
        logits = F.linear(F.gelu(F.linear(x, first.weight, first.bias), approximate=act.approximate), last.weight,
                          last.bias)
    else:
        logits = F.linear(x, seq[0].weight, seq[0].bias)
    gates, ids = gate.routing_probs(logits).topk(gate.top_k, dim=1)  # eval: no sampled experts
    return ids, gates, logits


def _project(module: nn.Module, x: Tensor) -> Tensor:
    return F.linear(x, module.weight, module.bias) if isinstance(module, nn.Linear) else x


def block_decode_step(block: nn.Module, hidden_states: Tensor, attention_mask: Optional[Tensor],
                      cache: Optional[Cache]) -> tuple[Tensor, None, tuple[Tensor, Tensor], None]:
    """One ``ModuleFormerBlock`` forward for a few tokens at inference (check :func:`decode_step_applies` first).

    Args:
        hidden_states: ``[B, T, d]`` with ``B * T <= FEW_TOKENS``.
        attention_mask: ``[B, past + T]`` 0/1 or None (all visible).
        cache: the transformers ``Cache`` (the new K/V are appended to layer ``block.attn.layer_idx``) or None.
    Returns:
        The block's tuple: ``(hidden_states [B, T, d], None, (attention router logits [B*T, E_att], MLP router
        logits [B*T, E_mlp]), None)``.
    """
    attn, mlp = block.attn, block.mlpf
    bsz, length, width = hidden_states.shape
    n_head, head_size, k_att = attn.n_head, attn.head_size, attn.top_k
    x = hidden_states.reshape(bsz * length, width)

    # mixture of attention heads: routed queries, shared K/V, stick-breaking attention, routed output maps
    h = _layer_norm(x, block.ln_1)
    att_ids, att_gates, att_logits = _route(attn.q_proj.gate, h)
    q = few_token_map(h, attn.q_proj.experts.weight, att_ids)  # [N, k, att_hidden], rows (t, j)
    keys = _project(attn.k_proj, h).view(bsz, length, n_head, head_size).transpose(1, 2)  # [B, H, T, D]
    values = _project(attn.v_proj, h).view(bsz, length, n_head, head_size).transpose(1, 2)
    if cache is not None:
        keys, values = cache.update(keys, values, attn.layer_idx)  # [B, H, S, D]
    check_mask_covers(attention_mask, bsz, keys.shape[2])
    qh = q.view(bsz, length * k_att, n_head, head_size).transpose(1, 2)  # [B, H, T*k, D]
    heads = head_major_stick_breaking(qh, keys, values, attention_mask, length, 1.0 / math.sqrt(head_size))
    heads = heads.transpose(1, 2).reshape(bsz * length, k_att, n_head * head_size).to(x.dtype)  # [N, k, att_hidden]
    x = x + few_token_reduce(heads, attn.q_proj.output_experts.weight, att_ids, att_gates.to(x.dtype))

    # routed MLP experts
    h = _layer_norm(x, block.ln_2)
    mlp_ids, mlp_gates, mlp_logits = _route(mlp.gate, h)
    inner = few_token_map(h, mlp.experts.weight, mlp_ids)  # [N, k, ffd_hidden]
    if mlp.activation is not None:
        inner = mlp.activation(inner)
    x = x + few_token_reduce(inner, mlp.output_experts.weight, mlp_ids, mlp_gates.to(x.dtype))
    return x.view(bsz, length, width), None, (att_logits, mlp_logits), None
