"""Lossless self-speculative decoding (LayerSkip-style): draft gamma tokens with exit k (blocks [0, k) and head k),
verify them with blocks [k, L) over all drafted positions in one forward, reusing the drafts' lower-block K/V; keep
the longest prefix the full model agrees with plus the full model's next token, and crop every block's cache to it.

Greedy: the output equals plain greedy decoding (the verifier is the full model on every prefix). Sampling: a draft
token is accepted with probability min(1, p/q), a rejection resamples from norm(max(0, p - q)) (Leviathan et al.),
so each row's output distribution equals plain sampling. Batches accept the shortest accepted prefix of the unfinished
rows (batch-synchronous); each row then emits its own outcome at that index, which keeps both properties."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .config import EarlyExitConfig
from .stack import LayerStack
from transformers.cache_utils import DynamicCache

from .state import DecodeStats, MaskBook, TokenSink


def _pick(logits: Tensor, cfg: EarlyExitConfig, generator: Optional[torch.Generator]) -> tuple[Tensor, Tensor]:
    """(token [B], probabilities [B, V] or the logits when greedy) of ``logits`` ``[B, V]``."""
    if not cfg.do_sample:
        return logits.argmax(-1), logits
    probs = torch.softmax(logits / cfg.temperature, dim=-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0], probs


def decode_self_speculative(stack: LayerStack, cfg: EarlyExitConfig, input_ids: Tensor, masks: MaskBook,
                            sink: TokenSink, stats: DecodeStats, generator: Optional[torch.Generator] = None,
                            record_experts: bool = False) -> DynamicCache:
    """Self-speculative decoding of ``input_ids`` ``[B, P]`` into ``sink`` (draft exit ``cfg.exit_layer``, draft
    length ``cfg.gamma``, capped by the tokens still allowed)."""
    draft_layers, num_layers = int(cfg.exit_layer), stack.num_layers
    cache = stack.new_cache()
    length = input_ids.shape[1]
    mask = masks.upto(length)
    h = stack.run(stack.embed(input_ids, 0, mask), 0, num_layers, cache, mask)
    token, _ = _pick(stack.logits(h[:, -1:], num_layers)[:, -1], cfg, generator)
    x = sink.push(token, num_layers)  # [B]; every block caches `length` positions, x is not cached yet
    while not sink.done:
        gamma = min(int(cfg.gamma), sink.remaining - 1)
        drafts, draft_probs, states = [], [], []
        current = x
        for j in range(gamma):
            mask = masks.upto(length + j + 1)
            hk = stack.run(stack.embed(current[:, None], length + j, mask), 0, draft_layers, cache, mask)
            states.append(hk)
            current, q = _pick(stack.logits(hk, draft_layers)[:, -1], cfg, generator)
            drafts.append(current)
            draft_probs.append(q)
        mask = masks.upto(length + gamma + 1)
        states.append(stack.run(stack.embed(current[:, None], length + gamma, mask), 0, draft_layers, cache, mask))
        route = [] if record_experts else None
        deep = stack.run(torch.cat(states, 1), draft_layers, num_layers, cache, mask, route=route)
        full_logits = stack.logits(deep, num_layers)  # [B, gamma + 1, V]: position j predicts after draft j
        stats.block_tokens += draft_layers * (gamma + 1) + (num_layers - draft_layers) * (gamma + 1)
        stats.head_calls += gamma + gamma + 1
        stats.steps += 1
        experts = stack.distinct_experts(route) if route is not None else None
        if experts is not None:
            stats.verify_experts.append(experts)
        tokens = _accept(cfg, drafts, draft_probs, full_logits, sink.finished, generator)
        accepted = len(tokens) - 1
        stats.drafted += gamma
        stats.accepted += accepted
        for t in tokens:
            x = sink.push(t, num_layers)
            if sink.done:
                return cache
        length += accepted + 1
        stack.crop(cache, length)
    return cache


def _accept(cfg: EarlyExitConfig, drafts: list[Tensor], draft_probs: list[Tensor], full_logits: Tensor,
            finished: Tensor, generator: Optional[torch.Generator]) -> list[Tensor]:
    """The tokens ``[B]`` each row emits this iteration: the accepted drafts (the shortest accepted prefix over the
    unfinished rows) and every row's own outcome at the first index not accepted by all."""
    gamma = len(drafts)
    if gamma == 0:
        return [_pick(full_logits[:, 0], cfg, generator)[0]]
    draft = torch.stack(drafts, 1)  # [B, gamma]
    if not cfg.do_sample:
        verified = full_logits.argmax(-1)  # [B, gamma + 1]
        ok = draft == verified[:, :gamma]
    else:
        p = torch.softmax(full_logits / cfg.temperature, dim=-1)  # [B, gamma + 1, V]
        q = torch.stack(draft_probs, 1)  # [B, gamma, V]
        p_tok = p[:, :gamma].gather(-1, draft[..., None])[..., 0]
        q_tok = q.gather(-1, draft[..., None])[..., 0]
        u = torch.rand(p_tok.shape, generator=generator, dtype=p_tok.dtype)
        ok = u * q_tok < p_tok  # accept with probability min(1, p / q)
    accepted_per_row = torch.cumprod(ok.long(), 1).sum(1)  # [B]
    live = ~finished
    n = int(accepted_per_row[live].min()) if bool(live.any()) else gamma
    out = [draft[:, j] for j in range(n)]
    if not cfg.do_sample:
        out.append(verified[:, n])
        return out
    if n == gamma:
        bonus = torch.multinomial(p[:, gamma], 1, generator=generator)[:, 0]
        out.append(bonus)
        return out
    residual = (p[:, n] - q[:, n]).clamp_min(0)
    mass = residual.sum(-1, keepdim=True)
    residual = torch.where(mass > 0, residual / mass.clamp_min(1e-30), p[:, n])
    resampled = torch.multinomial(residual, 1, generator=generator)[:, 0]
    out.append(torch.where(accepted_per_row > n, draft[:, n], resampled))
    return out
