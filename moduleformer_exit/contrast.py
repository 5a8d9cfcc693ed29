"""Auto-Contrastive Decoding (ACD, Gera et al. 2023): contrast an upper (expert) exit with a lower (amateur) exit."""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor


def auto_contrastive_log_probs(
    upper_logits: Tensor, lower_logits: Tensor, alpha: float = 0.1, minimum_candidates: int = 1
) -> Tensor:
    """ACD log-probabilities, independently at every position (any leading shape, vocabulary last).

    With ``p_up = softmax(upper)``, ``p_low = softmax(lower)``: the head set is
    ``H = {v : p_up(v) >= min(alpha * max p_up, the minimum_candidates-th largest p_up)}``; inside H the expert's mass
    ``M = sum_H p_up`` is redistributed proportionally to ``exp(log p_up - log p_low)``; outside H the expert
    probability is kept. Returns ``log p_ACD`` (normalised), float32.

    Computed in log space (``log_softmax``) so extreme logits never give NaN: where the literal formula's ``log 0``
    would appear (a probability underflowing to 0) this version stays finite; elsewhere they agree.
    """
    if upper_logits.shape != lower_logits.shape:
        raise ValueError(
            f"upper and lower logits must have the same shape, got {tuple(upper_logits.shape)} and "
            f"{tuple(lower_logits.shape)}."
        )
    lower = lower_logits.float()
    return auto_contrastive_log_probs_at_head(upper_logits, lambda ids: lower if ids is None else lower.gather(-1, ids),
                                              alpha, minimum_candidates)


def auto_contrastive_log_probs_at_head(
    upper_logits: Tensor, lower_logits_at: Callable[[Tensor], Tensor], alpha: float = 0.1,
    minimum_candidates: int = 1,
) -> Tensor:
    """:func:`auto_contrastive_log_probs` asking for the lower exit's logits inside the head set only.

    Only ``log p_up - log p_low`` on H enters, normalised over H, so ``log p_low`` may be off by any per-position
    constant: the lower logits themselves do, and only at the head candidates. Decode then reads a few rows of the
    lower exit's vocabulary projection instead of all of it.

    Args:
        upper_logits: ``[..., V]``.
        lower_logits_at: ``f(ids)`` with ``ids`` int64 ``[..., C]`` (vocabulary ids; C = the largest head set over
            the positions) returning the lower exit's float32 logits ``[..., C]`` there; ``f(None)``: all of them,
            ``[..., V]`` (asked instead when C > V / 4, where a gather would cost more than the full projection).
    Returns:
        ``log p_ACD`` ``[..., V]`` float32, as :func:`auto_contrastive_log_probs`.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}.")
    vocab = upper_logits.shape[-1]
    if not 1 <= minimum_candidates <= vocab:
        raise ValueError(f"minimum_candidates must be in [1, vocab size {vocab}], got {minimum_candidates}.")
    log_up = torch.log_softmax(upper_logits.float(), dim=-1)
    p_up = log_up.exp()
    kth_largest = p_up.topk(minimum_candidates, dim=-1).values[..., -1:]
    threshold = torch.minimum(alpha * p_up.amax(dim=-1, keepdim=True), kth_largest)
    in_head = p_up >= threshold
    log_mass = torch.logsumexp(log_up.masked_fill(~in_head, float("-inf")), dim=-1, keepdim=True)
    # H = the |H| most probable tokens (everything below the threshold is less probable than all of H), so the top
    # C = max |H| of every position hold its head set; the mask marks the members at positions with fewer.
    width = max(1, int(in_head.sum(-1).max())) if in_head.numel() else 1
    if width * 4 > vocab:  # wide head sets (a flat upper distribution): the full lower logits are cheaper
        score = (log_up - lower_logits_at(None)).masked_fill(~in_head, float("-inf"))
        return torch.where(in_head, log_mass + torch.log_softmax(score, dim=-1), log_up)
    candidate_p, candidates = p_up.topk(width, dim=-1)  # [..., C]
    member = candidate_p >= threshold
    log_up_c = log_up.gather(-1, candidates)
    score = (log_up_c - lower_logits_at(candidates)).masked_fill(~member, float("-inf"))
    redistributed = torch.where(member, log_mass + torch.log_softmax(score, dim=-1), log_up_c)
    return log_up.scatter(-1, candidates, redistributed)


def calculate_contrasted_logits(upper_layer_logits: Tensor, lower_layer_logits: Tensor, minimum_candidates: int = 1,
                                alpha: float = 0.1) -> Tensor:
    """autocontrastive-gen's name and argument order for :func:`auto_contrastive_log_probs` (drop-in)."""
    return auto_contrastive_log_probs(upper_layer_logits, lower_layer_logits, alpha, minimum_candidates)
