"""Expert usage on calibration tokens: per layer and per kind (attention experts, MLP experts), the top-k selection
count, the summed gate weight and a REAP-style contribution score of every expert; saved as ``usage.json``.

Contribution of expert e = mean over the (token, slot) pairs routed to e of ``gate * ||f_e(x)||_2``, with ``f_e(x)``
the expert's own output (MLP: ``act(x W_in[e]) W_out[e]``; attention: the slot's attention output times ``W_o[e]``).
Statistics are read by hooks during ordinary forwards (no change to the model's hot path); padding is excluded.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Iterable, Optional, Union

import torch
from torch import Tensor, nn

from ..kernels import expert_linear, plan_routing
from .layers import KINDS, backbone_config, config_hash, moe_layers, router_fingerprint

SCHEMA_VERSION = 1
STATISTICS = ("counts", "gate_mass", "contribution")
Batch = Union[Tensor, tuple, dict]


@dataclass
class ExpertUsage:
    """Usage statistics: ``stats[name][kind][layer]`` is a list with one float per expert of that layer.

    ``name`` in ``counts`` (top-k selections), ``gate_mass`` (summed top-k gate weight), ``contribution`` (mean
    gate x output norm over routed pairs, 0 for an expert never routed); ``kind`` in ``att`` / ``mlp``.
    """

    stats: dict[str, dict[str, list[list[float]]]]
    tokens: int
    config_hash: str
    router_fingerprint: str
    meta: dict = field(default_factory=dict)

    def scores(self, name: str, kind: str) -> list[Tensor]:
        """Per-layer ``[E_l]`` float64 tensors of statistic ``name`` for ``kind``."""
        if name not in STATISTICS:
            raise ValueError(f"unknown usage statistic {name!r}; choose from {', '.join(STATISTICS)}.")
        return [torch.tensor(layer, dtype=torch.float64) for layer in self.stats[name][kind]]

    def check_matches(self, model: nn.Module) -> None:
        """Raise ``ValueError`` if this usage was not collected on ``model`` (architecture or router weights)."""
        mine, theirs = (self.config_hash, self.router_fingerprint), (config_hash(model), router_fingerprint(model))
        if mine != theirs:
            what = "architecture (config hash)" if mine[0] != theirs[0] else "router weights"
            raise ValueError(
                f"this usage file was collected on another model: its {what} differs (usage {mine}, model "
                f"{theirs}). Collect usage on this checkpoint with `moduleformer-exit usage --model DIR ...`."
            )

    def to_dict(self) -> dict:
        return {"schema_version": SCHEMA_VERSION, "config_hash": self.config_hash,
                "router_fingerprint": self.router_fingerprint, "tokens": self.tokens, "meta": self.meta,
                **self.stats}

    def save(self, path: str) -> None:
        """Write ``usage.json``."""
        with open(path, "w", encoding="utf-8") as handle:
            json.dump(self.to_dict(), handle, indent=1)

    @classmethod
    def load(cls, path: str) -> "ExpertUsage":
        """Read a ``usage.json`` written by :meth:`save` (schema version checked)."""
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
        if data.get("schema_version") != SCHEMA_VERSION:
            raise ValueError(f"{path}: usage schema version {data.get('schema_version')!r}, this code reads "
                             f"{SCHEMA_VERSION}; recollect it with `moduleformer-exit usage`.")
        return cls(stats={name: data[name] for name in STATISTICS}, tokens=data["tokens"],
                   config_hash=data["config_hash"], router_fingerprint=data["router_fingerprint"],
                   meta=data.get("meta", {}))


def _split_batch(batch: Batch) -> tuple[Tensor, Optional[Tensor]]:
    if isinstance(batch, dict):
        return batch["input_ids"], batch.get("attention_mask")
    if isinstance(batch, (tuple, list)):
        return batch[0], (batch[1] if len(batch) > 1 else None)
    return batch, None


class _Accumulator:
    """Per-expert sums for one MoE layer, fed by hooks; ``mask`` is the current batch's flat real-token mask."""

    def __init__(self, num_experts: int, state: dict) -> None:
        self.state = state
        self.counts = torch.zeros(num_experts, dtype=torch.float64)
        self.gate_mass = torch.zeros(num_experts, dtype=torch.float64)
        self.contrib = torch.zeros(num_experts, dtype=torch.float64)

    def _real(self, indices: Tensor) -> Tensor:
        mask = self.state["mask"]  # [N] bool (rows of the flattened [B, T] batch)
        return mask.to(indices.device).unsqueeze(1).expand_as(indices)

    def add_routing(self, indices: Tensor, gates: Tensor) -> None:
        real = self._real(indices)
        idx = indices[real].cpu()
        self.counts.index_add_(0, idx, torch.ones(idx.numel(), dtype=torch.float64))
        self.gate_mass.index_add_(0, idx, gates[real].double().cpu())

    def add_contribution(self, indices: Tensor, gates: Tensor, norms: Tensor) -> None:
        """``norms`` ``[N, k]``: the norm of each selected expert's own output for each token."""
        real = self._real(indices)
        self.contrib.index_add_(0, indices[real].cpu(), (gates[real] * norms[real]).double().cpu())

    def contribution(self) -> Tensor:
        return torch.where(self.counts > 0, self.contrib / self.counts.clamp(min=1), 0.0)


def _mlp_output_norms(moe, x: Tensor, indices: Tensor) -> Tensor:
    """``[N, k]`` norms of ``act(x W_in[e]) W_out[e]`` for each token's selected experts (batched per expert)."""
    plan = plan_routing(indices, moe.num_experts)
    h = expert_linear(x, moe.experts.weight, plan, fan_out=moe.top_k, backend="torch")  # [N*k, H] token-major
    if moe.experts.bias is not None:
        h = h + moe.experts.bias[indices.flatten()]
    if moe.activation is not None:
        h = moe.activation(h)
    y = expert_linear(h, moe.output_experts.weight, plan, fan_out=1, backend="torch")  # [N*k, D]
    if moe.output_experts.bias is not None:
        y = y + moe.output_experts.bias[indices.flatten()]
    return y.float().norm(dim=-1).view_as(indices)


@torch.no_grad()
def collect_expert_usage(model: nn.Module, batches: Iterable[Batch], max_tokens: Optional[int] = None,
                         progress: bool = True) -> ExpertUsage:
    """Run ``model`` over ``batches`` and collect per-expert usage (see :class:`ExpertUsage`).

    Args:
        model: a ModuleFormer / multi-exit ModuleFormer causal LM (put in eval mode for the pass, restored after).
        batches: ``input_ids`` ``[B, T]`` tensors, ``(input_ids, attention_mask)`` pairs or dicts with those keys;
            positions with mask 0 are excluded from every statistic.
        max_tokens: stop once this many real tokens were seen (whole batches; the exact count is recorded).
        progress: show a tqdm bar over tokens.
    Returns:
        :class:`ExpertUsage` with ``tokens`` = real tokens seen.
    """
    from tqdm.auto import tqdm

    backbone_config(model)
    layers = moe_layers(model)
    state: dict = {"mask": None}
    acc = {kind: [_Accumulator(m.num_experts, state) for m in layers[kind]] for kind in KINDS}
    handles, restore = [], []

    def gate_hook(kind: str, layer: int):
        def hook(gate, inputs, routing):
            acc[kind][layer].add_routing(routing.top_k_indices, routing.top_k_gates)
            if kind == "mlp":
                norms = _mlp_output_norms(layers["mlp"][layer], inputs[0], routing.top_k_indices)
                acc[kind][layer].add_contribution(routing.top_k_indices, routing.top_k_gates, norms)
        return hook

    def wrap_reduce(layer: int):
        moe = layers["att"][layer]
        original = moe.reduce

        def reduce(x, routing, plan):
            # Ungated per-slot outputs y_tj = o_tj W_o[e_tj] ([N*k, D] token-major), then the model's own reduce.
            per_slot = expert_linear(x.reshape(-1, x.shape[-1]), moe.output_experts.weight, plan, fan_out=1,
                                     backend="torch")
            norms = per_slot.float().norm(dim=-1).view_as(routing.top_k_indices)
            acc["att"][layer].add_contribution(routing.top_k_indices, routing.top_k_gates, norms)
            return original(x, routing, plan)

        moe.reduce = reduce
        restore.append(moe)

    for kind in KINDS:
        for layer, moe in enumerate(layers[kind]):
            handles.append(moe.gate.register_forward_hook(gate_hook(kind, layer)))
    for layer in range(len(layers["att"])):
        wrap_reduce(layer)
    was_training = model.training
    model.eval()
    tokens = 0
    bar = tqdm(total=max_tokens, unit="tok", desc="expert usage", disable=not progress)
    device = next(model.parameters()).device
    try:
        for batch in batches:
            if max_tokens is not None and tokens >= max_tokens:
                break
            input_ids, mask = _split_batch(batch)
            if mask is None:
                mask = torch.ones_like(input_ids)
            state["mask"] = mask.reshape(-1).bool()
            model(input_ids=input_ids.to(device), attention_mask=mask.to(device), use_cache=False)
            seen = int(mask.sum())
            tokens += seen
            bar.update(seen)
    finally:
        bar.close()
        for handle in handles:
            handle.remove()
        for moe in restore:
            del moe.reduce  # back to the class method
        model.train(was_training)
    if tokens == 0:
        raise ValueError("no real token in the usage batches (empty data or all positions masked).")
    stats = {
        "counts": {kind: [a.counts.tolist() for a in acc[kind]] for kind in KINDS},
        "gate_mass": {kind: [a.gate_mass.tolist() for a in acc[kind]] for kind in KINDS},
        "contribution": {kind: [a.contribution().tolist() for a in acc[kind]] for kind in KINDS},
    }
    return ExpertUsage(stats=stats, tokens=tokens, config_hash=config_hash(model),
                       router_fingerprint=router_fingerprint(model))
