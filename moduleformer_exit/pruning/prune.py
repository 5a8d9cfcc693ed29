"""Structural expert pruning: slice the expert tensors and the router's output rows of every layer, update the config.

The result is a genuinely smaller model whose routing over the kept experts equals the unpruned model's routing with
the dropped experts' router logits at -inf (ModuleFormer's softmax runs over the router's outputs, so removing rows is
the same as masking them; the top-k gates are not renormalised in either case).
"""
from __future__ import annotations

import json
import os
from typing import Any, Mapping, Optional, Sequence

import torch
from torch import nn

from ..moe import MoE
from .layers import KINDS, backbone_config, moe_layers

Keep = Mapping[str, Optional[Sequence[Sequence[int]]]]  # {"att": per-layer kept ids or None, "mlp": ...}


def validate_keep(model: nn.Module, keep: Keep) -> dict[str, Optional[list[list[int]]]]:
    """Check a keep list against the model and normalise it (ids sorted ascending, ints).

    ``keep``: ``{"att": [[ids of layer 0], [ids of layer 1], ...], "mlp": [...]}``; a kind that is missing or None is
    left unpruned. Raises ``ValueError`` for an unknown kind, a wrong number of layers, an empty layer, a repeated or
    out-of-range id, or fewer experts kept than the layer's top-k.
    """
    unknown = set(keep) - set(KINDS)
    if unknown:
        raise ValueError(f"unknown expert kind(s) {sorted(unknown)} in keep; use 'att' and/or 'mlp'.")
    layers = moe_layers(model)
    out: dict[str, Optional[list[list[int]]]] = {}
    for kind in KINDS:
        ids = keep.get(kind)
        if ids is None:
            out[kind] = None
            continue
        if len(ids) != len(layers[kind]):
            raise ValueError(f"keep[{kind!r}] lists {len(ids)} layers but the model has {len(layers[kind])}: give "
                             f"one list of kept expert ids per layer.")
        normalised = []
        for layer, (layer_ids, moe) in enumerate(zip(ids, layers[kind])):
            layer_ids = [int(i) for i in layer_ids]
            if not layer_ids:
                raise ValueError(f"keep[{kind!r}][{layer}] is empty: a layer must keep at least k={moe.top_k} "
                                 f"experts.")
            if len(set(layer_ids)) != len(layer_ids):
                raise ValueError(f"keep[{kind!r}][{layer}] repeats an expert id: {layer_ids}.")
            bad = [i for i in layer_ids if not 0 <= i < moe.num_experts]
            if bad:
                raise ValueError(f"keep[{kind!r}][{layer}] has expert id(s) {bad} out of range: layer {layer} has "
                                 f"{moe.num_experts} {kind} experts (ids 0..{moe.num_experts - 1}).")
            if len(layer_ids) < moe.top_k:
                raise ValueError(f"keep[{kind!r}][{layer}] keeps {len(layer_ids)} experts but each token uses "
                                 f"k={moe.top_k} of them: keep at least {moe.top_k} (or lower k_{kind} first).")
            normalised.append(sorted(layer_ids))
        out[kind] = normalised
    return out


def _slice_parameter(param: nn.Parameter, index: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(param.detach().index_select(0, index.to(param.device)).clone(),
                        requires_grad=param.requires_grad)


def router_rows(moe: MoE) -> tuple[nn.Module, str]:
    """(module, parameter name) of the router tensor with one row per expert: the last Linear of the ``mlp`` gate,
    the ``linear`` gate's Linear, or the ``gmm`` centroids."""
    gate = moe.gate
    if gate.gate_type == "mlp":
        return gate.w_gate[3], "weight"
    if gate.gate_type == "linear":
        return gate.w_gate[0], "weight"
    return gate, "expert_centroids"


def slice_moe(moe: MoE, ids: Sequence[int]) -> None:
    """Keep experts ``ids`` (sorted) of one MoE in place: expert tensors, biases and router rows ``[E] -> [len(ids)]``."""
    index = torch.as_tensor(list(ids), dtype=torch.long)
    for experts in (moe.experts, moe.output_experts):
        experts.weight = _slice_parameter(experts.weight, index)
        if experts.bias is not None:
            experts.bias = _slice_parameter(experts.bias, index)
        experts.num_experts = len(ids)
    module, name = router_rows(moe)
    setattr(module, name, _slice_parameter(getattr(module, name), index))
    if isinstance(module, nn.Linear):
        module.out_features = len(ids)
    moe.num_experts = moe.gate.num_experts = len(ids)


def prune_experts(model: nn.Module, keep: Keep) -> nn.Module:
    """Remove every expert not in ``keep`` from ``model`` (in place; also returned) and update its config.

    Args:
        model: a ModuleFormer / multi-exit ModuleFormer causal LM.
        keep: ``{"att": per-layer kept ids, "mlp": per-layer kept ids}`` (see :func:`validate_keep`); expert tensors
            ``[E, in, out] -> [E_kept, in, out]``, router rows ``[E, h] -> [E_kept, h]``, in ascending id order.
    Returns:
        The model, with ``config.n_att_experts`` / ``n_mlp_experts`` set to the per-layer counts (an int when every
        layer keeps the same number, IBM's form).
    """
    keep = validate_keep(model, keep)
    layers = moe_layers(model)
    for kind in KINDS:
        if keep[kind] is None:
            continue
        for moe, ids in zip(layers[kind], keep[kind]):
            if ids != list(range(moe.num_experts)):
                slice_moe(moe, ids)
    counts = {kind: [m.num_experts for m in layers[kind]] for kind in KINDS}
    backbone_config(model).set_expert_counts(att=counts["att"], mlp=counts["mlp"])
    return model


def write_pruning_record(out_dir: str, record: dict[str, Any]) -> str:
    """Write ``pruning.json`` (criterion, budget, kept ids, calibration hash, perplexities...) beside a checkpoint."""
    path = os.path.join(out_dir, "pruning.json")
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(record, handle, indent=2)
    return path
