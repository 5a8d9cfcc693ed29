"""Where a ModuleFormer's routed experts live: the (attention, MLP) MoE layers of every block, and a fingerprint of
the model they belong to (so a usage file or a keep list is never applied to another model)."""
from __future__ import annotations

import hashlib
import json

from torch import nn

from ..moe import MoE

KINDS = ("att", "mlp")  # attention experts (MoA query/output projections) and MLP experts


def backbone_config(model: nn.Module):
    """The ``ModuleFormerConfig`` of a ModuleFormer / multi-exit ModuleFormer causal LM (or its base model)."""
    config = getattr(model, "config", None)
    if config is None or getattr(config, "model_type", None) != "moduleformer":
        raise TypeError(
            f"expected a ModuleFormer model (model_type 'moduleformer'), got {type(model).__name__}; expert usage, "
            f"pruning and extension apply to ModuleFormer and multi-exit ModuleFormer checkpoints only."
        )
    return config


def moe_layers(model: nn.Module) -> dict[str, list[MoE]]:
    """``{"att": [block.attn.q_proj ...], "mlp": [block.mlpf ...]}``, one MoE per block, in layer order."""
    backbone_config(model)
    base = getattr(model, "transformer", model)
    blocks = list(base.h)
    return {"att": [b.attn.q_proj for b in blocks], "mlp": [b.mlpf for b in blocks]}


def expert_counts(model: nn.Module) -> dict[str, list[int]]:
    """Experts per layer of each kind, read from the modules (``{"att": [E_0, ...], "mlp": [...]}``)."""
    return {kind: [m.num_experts for m in layers] for kind, layers in moe_layers(model).items()}


_ARCH_FIELDS = ("vocab_size", "n_embd", "n_layer", "n_head", "att_hidden", "ffd_hidden", "gating_size",
                "n_att_experts", "k_att", "n_mlp_experts", "k_mlp", "gate_type", "activation_function")


def config_hash(model: nn.Module) -> str:
    """sha256 (first 16 hex digits) of the architecture fields of the model's config (sizes, expert counts, gate)."""
    config = backbone_config(model)
    fields = {name: getattr(config, name) for name in _ARCH_FIELDS}
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


def router_fingerprint(model: nn.Module) -> str:
    """sha256 (first 16 hex digits) of every router's parameters: tells two models of one architecture apart."""
    digest = hashlib.sha256()
    for kind, layers in moe_layers(model).items():
        for moe in layers:
            for _, p in sorted(moe.gate.named_parameters()):
                digest.update(p.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]
