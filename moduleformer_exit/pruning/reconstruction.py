"""NAEE's reconstruction criterion: per layer, keep the expert subset whose MoE output on calibration tokens is
closest (squared L2, fp64 sum) to the unpruned output when the dropped experts' router logits are -inf.

Layer-wise (NAEE's ``layerwise_pruning``): every layer is scored on the unpruned model's inputs. The search is
exhaustive over ``C(E, n_keep)`` subsets when that is at most ``max_combinations``, greedy elimination above (drop,
one at a time, the expert whose removal increases the error least). Offline analysis: the outputs of every expert on
every calibration token are computed once per layer (batched per expert), then each subset costs one top-k.
"""
from __future__ import annotations

import itertools
import math
from typing import Iterable, Optional, Sequence

import torch
from torch import Tensor, nn

from ..kernels import stick_breaking_attention
from .layers import KINDS, moe_layers
from .usage import Batch, _split_batch


def _all_mlp_outputs(moe, x: Tensor) -> Tensor:
    """``[N, E, D]``: ``act(x W_in[e]) W_out[e]`` of every expert e for tokens ``x`` ``[N, D]``."""
    h = torch.einsum("nd,edh->neh", x, moe.experts.weight)
    if moe.experts.bias is not None:
        h = h + moe.experts.bias
    if moe.activation is not None:
        h = moe.activation(h)
    y = torch.einsum("neh,ehd->ned", h, moe.output_experts.weight)
    return y + moe.output_experts.bias if moe.output_experts.bias is not None else y


def _all_attention_outputs(attn, x: Tensor, mask: Optional[Tensor]) -> Tensor:
    """``[B, T, E, D]``: every attention expert's output (its queries through the shared K/V, then its W_o)."""
    moe = attn.q_proj
    bsz, length, _ = x.shape
    q = torch.einsum("btd,edh->bteh", x, moe.experts.weight)
    q = q.reshape(bsz, length, moe.num_experts, attn.n_head, attn.head_size)
    k = attn.k_proj(x).view(bsz, length, attn.n_head, attn.head_size)
    v = attn.v_proj(x).view(bsz, length, attn.n_head, attn.head_size)
    o = stick_breaking_attention(q, k, v, mask, backend="torch").reshape(bsz, length, moe.num_experts, -1)
    return torch.einsum("bteh,ehd->bted", o, moe.output_experts.weight)


class LayerProblem:
    """One layer's calibration data: router logits ``[N, E]`` and expert outputs ``[N, E, D]`` of real tokens."""

    def __init__(self, logits: Tensor, outputs: Tensor, top_k: int) -> None:
        self.logits, self.outputs, self.top_k = logits.float(), outputs.float(), top_k
        self.full = self.output(torch.ones(logits.shape[1], dtype=torch.bool))

    def output(self, keep: Tensor) -> Tensor:
        """``[N, D]`` MoE output with the experts outside ``keep`` (bool ``[E]``) masked out of the router."""
        probs = torch.softmax(self.logits.masked_fill(~keep, float("-inf")), dim=-1)
        gates, idx = probs.topk(self.top_k, dim=-1)
        picked = self.outputs.gather(1, idx.unsqueeze(-1).expand(-1, -1, self.outputs.shape[-1]))
        return (gates.unsqueeze(-1) * picked).sum(1)

    def error(self, kept: Sequence[int]) -> float:
        keep = torch.zeros(self.logits.shape[1], dtype=torch.bool)
        keep[list(kept)] = True
        return float((self.output(keep) - self.full).double().pow(2).sum())

    def search(self, n_keep: int, max_combinations: int) -> tuple[list[int], float, str]:
        """(kept ids, error, "exhaustive" | "greedy")."""
        num = self.logits.shape[1]
        if math.comb(num, n_keep) <= max_combinations:
            best = min(itertools.combinations(range(num), n_keep), key=self.error)
            return list(best), self.error(best), "exhaustive"
        kept = list(range(num))
        while len(kept) > n_keep:
            kept = min(([e for e in kept if e != drop] for drop in kept), key=self.error)
        return kept, self.error(kept), "greedy"


@torch.no_grad()
def layer_problems(model: nn.Module, batches: Iterable[Batch], kinds: Sequence[str] = KINDS
                   ) -> dict[str, list[LayerProblem]]:
    """Capture every layer's MoE inputs during unpruned forwards over ``batches`` and build its :class:`LayerProblem`."""
    layers = moe_layers(model)
    base = getattr(model, "transformer", model)
    captured = {kind: [[] for _ in layers[kind]] for kind in kinds}
    handles = []

    def attn_hook(layer):
        def hook(module, args):
            x, mask = args[0], args[1]
            real = state["mask"].view(x.shape[0], x.shape[1])
            outs = _all_attention_outputs(module, x, mask)[real]
            logits = module.q_proj.gate.compute_logits(x[real])
            captured["att"][layer].append((logits, outs))
        return hook

    def mlp_hook(layer):
        def hook(module, args):
            x = args[0].reshape(-1, args[0].shape[-1])[state["mask"]]
            captured["mlp"][layer].append((module.gate.compute_logits(x), _all_mlp_outputs(module, x)))
        return hook

    state: dict = {}
    for layer, block in enumerate(base.h):
        if "att" in kinds:
            handles.append(block.attn.register_forward_pre_hook(attn_hook(layer)))
        if "mlp" in kinds:
            handles.append(block.mlpf.register_forward_pre_hook(mlp_hook(layer)))
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        for batch in batches:
            input_ids, mask = _split_batch(batch)
            mask = torch.ones_like(input_ids) if mask is None else mask
            state["mask"] = mask.reshape(-1).bool().to(device)
            model(input_ids=input_ids.to(device), attention_mask=mask.to(device), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    problems = {}
    for kind in kinds:
        problems[kind] = []
        for moe, parts in zip(layers[kind], captured[kind]):
            if not parts:
                raise ValueError("no calibration batch for the reconstruction criterion.")
            problems[kind].append(LayerProblem(torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]),
                                               moe.top_k))
    return problems


def reconstruction_keep(model: nn.Module, batches: Iterable[Batch], keep_counts: dict[str, Sequence[int]],
                        max_combinations: int = 5000) -> tuple[dict[str, list[list[int]]], dict]:
    """Kept ids per kind and layer minimising the layer-output reconstruction error (see the module docstring).

    Args:
        keep_counts: ``{"mlp": [n_keep per layer], "att": [...]}`` (kinds absent are not searched).
    Returns:
        ``(keep, info)`` with ``info[kind]`` = per-layer ``{"error", "search"}``.
    """
    batches = list(batches)
    problems = layer_problems(model, batches, tuple(keep_counts))
    keep, info = {}, {}
    for kind, counts in keep_counts.items():
        keep[kind], info[kind] = [], []
        for problem, n in zip(problems[kind], counts):
            ids, err, how = problem.search(n, max_combinations)
            keep[kind].append(ids)
            info[kind].append({"error": err, "search": how})
    return keep, info
