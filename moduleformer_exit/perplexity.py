"""Held-out perplexity of a causal LM's own head and of every exit head, from the losses the model returns.

The one place perplexity is computed (pretraining's evaluation, exit training, pruning reports, benchmarks): it
reads ``lm_loss`` (the original head's shifted cross-entropy) and, for multi-exit models, ``exit_losses`` from the
model's output, so the loss definition stays the model's own.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch
from torch import Tensor


@torch.no_grad()
def heldout_perplexities(model: Callable, blocks: Tensor, batch_size: int = 16,
                         attention_mask: Optional[Tensor] = None) -> dict[str, float]:
    """Token-weighted held-out perplexity per head: ``{"final": ppl, "exit<k>": ppl, ...}``.

    Args:
        model: a ModuleFormer / multi-exit causal LM, or anything that forwards to one (a DeepSpeed engine), called
            as ``model(input_ids=x, labels=labels, attention_mask=m)``; its output must carry ``lm_loss`` (a
            ModuleFormer or multi-exit output) or ``loss``, and ``exit_losses`` for exits.
        blocks: ``[N, T]`` token ids; the labels are the ids themselves (next-token prediction inside each block).
        batch_size: blocks per forward.
        attention_mask: optional ``[N, T]`` 0/1; masked positions are excluded from the labels too.
    Returns:
        ``exp`` of the mean next-token cross-entropy over all predicted tokens, per head. The model is put in eval
        mode for the pass and back in its previous mode afterwards.
    """
    if blocks.dim() != 2 or blocks.shape[1] < 2:
        raise ValueError(f"blocks must be [N, T] token ids with T >= 2, got shape {tuple(blocks.shape)}.")
    was_training = model.training
    model.eval()
    sums: dict[str, float] = {}
    total = 0
    try:
        for start in range(0, blocks.shape[0], batch_size):
            x = blocks[start:start + batch_size]
            labels = x.clone()
            mask = None
            if attention_mask is not None:
                mask = attention_mask[start:start + batch_size]
                labels = labels.masked_fill(mask == 0, -100)
            tokens = int((labels[:, 1:] != -100).sum())
            if tokens == 0:
                continue
            device = getattr(model, "device", x.device)
            out = model(input_ids=x.to(device), labels=labels.to(device),
                        **({"attention_mask": mask.to(device)} if mask is not None else {}))
            lm_loss = getattr(out, "lm_loss", None)
            losses = {"final": out.loss if lm_loss is None else lm_loss}
            for layer, loss in (getattr(out, "exit_losses", None) or {}).items():
                losses[f"exit{layer}"] = loss
            for name, loss in losses.items():
                sums[name] = sums.get(name, 0.0) + float(loss) * tokens
            total += tokens
    finally:
        model.train(was_training)
    if total == 0:
        raise ValueError("No token to predict in the held-out blocks (all labels masked).")
    return {name: math.exp(value / total) for name, value in sums.items()}
