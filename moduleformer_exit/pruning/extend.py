"""Extension: append new experts (and router rows) to every layer, and freeze everything else.

ModuleFormer stacks a layer's experts in one ``[E, in, out]`` tensor, so freezing the old experts is a gradient mask
on a slice (a tensor hook zeroing ``grad[:E_old]``), not ``requires_grad=False``. Decoupled weight decay would still
move the old slice, so the stacked tensors go in a zero-decay group and :meth:`ExtensionMask.decay_new_slices`
applies AdamW's decoupled decay ``p <- p * (1 - lr * wd)`` to the new rows only (call it before each optimizer step,
which is where ``torch.optim.AdamW`` applies it).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from .layers import KINDS, backbone_config, moe_layers
from .prune import router_rows


def _grown(param: nn.Parameter, new_rows: Tensor) -> nn.Parameter:
    return nn.Parameter(torch.cat([param.detach(), new_rows.to(param.dtype).to(param.device)], dim=0))


def _clone_sources(num_old: int, num_new: int, scores: Optional[Tensor]) -> list[int]:
    """Experts to clone: the highest-scoring ones (cycling), or ids 0, 1, ... without scores."""
    order = (torch.sort(scores, descending=True, stable=True).indices.tolist() if scores is not None
             else list(range(num_old)))
    return [order[i % num_old] for i in range(num_new)]


def grow_moe(moe, num_new: int, init: str, initializer_range: float, generator: torch.Generator,
             scores: Optional[Tensor] = None) -> None:
    """Append ``num_new`` experts to one MoE (expert tensors, biases, router rows), in place."""
    num_old = moe.num_experts
    sources = _clone_sources(num_old, num_new, scores)
    for experts in (moe.experts, moe.output_experts):
        w = experts.weight
        if init == "clone":
            rows = w.detach()[sources].clone()
        else:  # IBM's expert init U(-1/in, 1/in)
            bound = 1.0 / experts.input_size
            rows = (torch.rand((num_new,) + tuple(w.shape[1:]), generator=generator, dtype=torch.float64) * 2 - 1)
            rows = rows * bound
        experts.weight = _grown(w, rows)
        if experts.bias is not None:
            experts.bias = _grown(experts.bias, experts.bias.detach()[sources].clone() if init == "clone"
                                  else torch.zeros((num_new,) + tuple(experts.bias.shape[1:])))
        experts.num_experts = num_old + num_new
    module, name = router_rows(moe)
    rows_param = getattr(module, name)
    if init == "clone":
        rows = rows_param.detach()[sources].clone()
    else:  # the model's init of that tensor: N(0, initializer_range) for Linear rows, N(0, 1) for gmm centroids
        std = 1.0 if name == "expert_centroids" else initializer_range
        rows = torch.randn((num_new,) + tuple(rows_param.shape[1:]), generator=generator, dtype=torch.float64) * std
    setattr(module, name, _grown(rows_param, rows))
    if isinstance(module, nn.Linear):
        module.out_features = num_old + num_new
    moe.num_experts = moe.gate.num_experts = num_old + num_new


@dataclass
class ExtensionMask:
    """The trainable stacked tensors of an extended model and how many leading rows of each stay frozen."""

    frozen_rows: list[tuple[nn.Parameter, int]] = field(default_factory=list)
    handles: list = field(default_factory=list)

    @property
    def parameters(self) -> list[nn.Parameter]:
        return [p for p, _ in self.frozen_rows]

    @torch.no_grad()
    def decay_new_slices(self, lr: float, weight_decay: float) -> None:
        """Decoupled weight decay of the new rows only: ``p[E_old:] *= 1 - lr * weight_decay``."""
        if weight_decay:
            for p, n_old in self.frozen_rows:
                p[n_old:].mul_(1.0 - lr * weight_decay)

    def remove(self) -> None:
        """Remove the gradient hooks."""
        for handle in self.handles:
            handle.remove()
        self.handles.clear()


def add_experts(model: nn.Module, n_att: int = 0, n_mlp: int = 0, init: str = "random", seed: int = 0,
                usage=None) -> nn.Module:
    """Append ``n_att`` attention and ``n_mlp`` MLP experts to every layer (in place; also returned).

    Args:
        init: ``"random"`` (the model's own init of expert tensors and router rows) or ``"clone"`` (copies of the
            most-used experts when ``usage`` (an :class:`~moduleformer_exit.pruning.usage.ExpertUsage` of this
            model) is given, else of experts 0, 1, ...; router rows copied too).
    Returns:
        The model: expert tensors ``[E_l + n, in, out]``, router rows ``[E_l + n, h]``, config counts updated.
    """
    if init not in ("random", "clone"):
        raise ValueError(f"init must be 'random' or 'clone', got {init!r}.")
    for name, n in (("n_att", n_att), ("n_mlp", n_mlp)):
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"{name} must be an integer >= 0, got {n!r}.")
    if n_att == 0 and n_mlp == 0:
        raise ValueError("add_experts needs n_att > 0 or n_mlp > 0 (nothing to add).")
    config = backbone_config(model)
    if usage is not None:
        usage.check_matches(model)
    generator = torch.Generator().manual_seed(seed)
    layers = moe_layers(model)
    for kind, n in (("att", n_att), ("mlp", n_mlp)):
        if n == 0:
            continue
        scores = usage.scores("counts", kind) if usage is not None else [None] * len(layers[kind])
        for moe, s in zip(layers[kind], scores):
            grow_moe(moe, n, init, config.initializer_range, generator, s)
    config.set_expert_counts(att=[m.num_experts for m in layers["att"]], mlp=[m.num_experts for m in layers["mlp"]])
    return model


def _stacked(moe) -> list[nn.Parameter]:
    module, name = router_rows(moe)
    params = [moe.experts.weight, moe.output_experts.weight, getattr(module, name)]
    params += [b for b in (moe.experts.bias, moe.output_experts.bias) if b is not None]
    return params


def freeze_old_experts(model: nn.Module, old_counts: dict[str, Sequence[int]]) -> ExtensionMask:
    """Freeze everything but the experts / router rows appended after ``old_counts`` (``{"att": [E_l], "mlp": ...}``,
    the counts before :func:`add_experts`). Returns the :class:`ExtensionMask` of the trainable stacked tensors."""
    layers = moe_layers(model)
    for p in model.parameters():
        p.requires_grad_(False)
    mask = ExtensionMask()
    for kind in KINDS:
        for moe, n_old in zip(layers[kind], old_counts[kind]):
            if moe.num_experts == n_old:
                continue
            if moe.num_experts < n_old:
                raise ValueError(f"old_counts[{kind!r}] ({n_old}) exceeds the layer's {moe.num_experts} experts.")
            for p in _stacked(moe):
                p.requires_grad_(True)

                def hook(grad: Tensor, n_old: int = n_old) -> Tensor:
                    grad = grad.clone()
                    grad[:n_old] = 0  # the old experts / router rows get no gradient
                    return grad

                mask.handles.append(p.register_hook(hook))
                mask.frozen_rows.append((p, n_old))
    if not mask.frozen_rows:
        raise ValueError("no layer has new experts: call add_experts first.")
    return mask
