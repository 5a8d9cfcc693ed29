"""From a criterion and a budget to kept expert ids: the one entry point the ``prune`` command and the report use.

Criteria: ``frequency`` / ``gate-mass`` / ``contribution`` (usage statistics on calibration tokens), ``loss``
(leave-one-out: the rise of the calibration loss when that expert alone is masked out of its router; with
``heads="all"`` the loss is the sum over the original head and every exit head, so exits stay usable),
``reconstruction`` (NAEE, :mod:`.reconstruction`) and ``random`` (the seeded baseline).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from .layers import KINDS, moe_layers
from .reconstruction import reconstruction_keep
from .select import Budget, SCORE_CRITERIA, layer_keep_counts, random_scores, select_by_scores
from .usage import ExpertUsage, collect_expert_usage

CRITERIA = ("frequency", "gate-mass", "contribution", "loss", "reconstruction", "random")


@torch.no_grad()
def calibration_loss(model: nn.Module, blocks: Tensor, heads: str = "final", batch_size: int = 8) -> float:
    """Mean next-token loss on ``blocks`` ``[N, T]``: the original head's (``heads="final"``) or its sum with every
    exit head's (``heads="all"``)."""
    total = 0.0
    for start in range(0, blocks.shape[0], batch_size):
        x = blocks[start:start + batch_size]
        out = model(input_ids=x, labels=x, use_cache=False)
        loss = out.lm_loss if getattr(out, "lm_loss", None) is not None else out.loss
        if heads == "all":
            loss = loss + sum((getattr(out, "exit_losses", None) or {}).values())
        total += float(loss) * x.shape[0]
    return total / blocks.shape[0]


@torch.no_grad()
def loss_scores(model: nn.Module, blocks: Tensor, kinds: Sequence[str], heads: str = "final",
                batch_size: int = 8) -> dict[str, list[Tensor]]:
    """Leave-one-out scores ``[E_l]`` per kind and layer: calibration loss with expert e masked minus the base loss."""
    was_training = model.training
    model.eval()
    base = calibration_loss(model, blocks, heads, batch_size)
    layers = moe_layers(model)
    scores: dict[str, list[Tensor]] = {}
    try:
        for kind in kinds:
            scores[kind] = []
            for moe in layers[kind]:
                gate, original = moe.gate, moe.gate.compute_logits
                layer_scores = torch.zeros(moe.num_experts, dtype=torch.float64)
                for e in range(moe.num_experts):
                    gate.compute_logits = lambda x, e=e: original(x).index_fill(1, torch.tensor([e]), float("-inf"))
                    layer_scores[e] = calibration_loss(model, blocks, heads, batch_size) - base
                del gate.compute_logits
                scores[kind].append(layer_scores)
    finally:
        model.train(was_training)
    return scores


def choose_keep(model: nn.Module, criterion: str, budgets: dict[str, Optional[Budget]], calibration: Tensor,
                usage: Optional[ExpertUsage] = None, spread: str = "uniform", heads: str = "final", seed: int = 0,
                max_combinations: int = 5000, batch_size: int = 8, progress: bool = False) -> tuple[dict, dict]:
    """Kept ids per kind (``{"att": [[...], ...] or None, "mlp": ...}``) for ``budgets`` (``{"mlp": 0.5, "att": None}``).

    Args:
        calibration: ``[N, T]`` calibration token blocks (usage / loss / reconstruction are measured on them).
        usage: precomputed usage of this model (checked against it); collected on ``calibration`` when needed.
    Returns:
        ``(keep, info)``; ``info`` holds per-layer errors for ``reconstruction``.
    """
    if criterion not in CRITERIA:
        raise ValueError(f"unknown criterion {criterion!r}; choose from {', '.join(CRITERIA)}.")
    if heads not in ("final", "all"):
        raise ValueError(f"heads must be 'final' or 'all', got {heads!r}.")
    layers = moe_layers(model)
    kinds = [kind for kind in KINDS if budgets.get(kind) is not None]
    if not kinds:
        raise ValueError("give a budget for at least one expert kind (keep-mlp and/or keep-att).")
    counts = {kind: [m.num_experts for m in layers[kind]] for kind in KINDS}
    top_k = {kind: layers[kind][0].top_k for kind in KINDS}
    keep: dict = {kind: None for kind in KINDS}
    info: dict = {}
    if criterion == "reconstruction":
        if spread != "uniform":
            raise ValueError("the reconstruction criterion searches subsets per layer: use spread='uniform'.")
        n_keep = {kind: layer_keep_counts(counts[kind], budgets[kind], top_k[kind]) for kind in kinds}
        batches = [calibration[i:i + batch_size] for i in range(0, calibration.shape[0], batch_size)]
        found, info = reconstruction_keep(model, batches, n_keep, max_combinations)
        keep.update(found)
        return keep, info
    if criterion in SCORE_CRITERIA:
        if usage is None:
            batches = [calibration[i:i + batch_size] for i in range(0, calibration.shape[0], batch_size)]
            usage = collect_expert_usage(model, batches, progress=progress)
        usage.check_matches(model)
        scores = {kind: usage.scores(SCORE_CRITERIA[criterion], kind) for kind in kinds}
    elif criterion == "loss":
        scores = loss_scores(model, calibration, kinds, heads, batch_size)
    else:
        generator_seeds = {"att": seed, "mlp": seed + 1}
        scores = {kind: random_scores(counts[kind], generator_seeds[kind]) for kind in kinds}
    for kind in kinds:
        keep[kind] = select_by_scores(scores[kind], budgets[kind], top_k[kind], spread)
    info["scores"] = {kind: [s.tolist() for s in scores[kind]] for kind in kinds}
    return keep, info
