"""CALM for a decoder-only ModuleFormer: per token, exit at the first candidate layer whose confidence passes the
(optionally decaying) threshold; the skipped blocks get K/V projected from the exit state (state propagation), so
later tokens attend over a complete cache. Decisions are batch-synchronous (exit only when every unfinished row is
confident)."""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .config import EarlyExitConfig
from .stack import LayerStack, softmax_margin
from transformers.cache_utils import DynamicCache

from .state import DecodeStats, MaskBook, TokenSink


def candidate_layers(stack: LayerStack, cfg: EarlyExitConfig) -> list[int]:
    """Sorted exit layers CALM checks: ``cfg.exit_layers`` (default: layers with a head) within
    ``[min_layer, L)``."""
    layers = cfg.exit_layers if cfg.exit_layers is not None else stack.head_layers
    return sorted(k for k in set(int(k) for k in layers) if cfg.min_layer <= k < stack.num_layers)


def calm_threshold(cfg: EarlyExitConfig, step: int, max_new_tokens: int) -> float:
    """``threshold`` at new-token index ``step``: fixed, or CALM's decay
    ``clip(0.9 * lam + 0.1 * exp(-tau * step / N), 0, 1)`` with ``tau = decay_temperature``, N = max_new_tokens."""
    if cfg.decay_temperature is None:
        return float(cfg.threshold)
    value = 0.9 * cfg.threshold + 0.1 * math.exp(-cfg.decay_temperature * step / max(max_new_tokens, 1))
    return min(max(value, 0.0), 1.0)


def _confidence(stack: LayerStack, cfg: EarlyExitConfig, h: Tensor, prev: Optional[Tensor], layer: int
                ) -> tuple[Tensor, Optional[Tensor]]:
    """(confidence [B], exit logits [B, V] or None) of the state ``h`` ``[B, 1, D]`` after ``layer`` blocks."""
    if cfg.confidence == "saturation":
        return F.cosine_similarity(h[:, -1].float(), prev[:, -1].float(), dim=-1), None
    logits = stack.logits(h[:, -1:], layer)[:, -1]
    return softmax_margin(logits), logits


def _confident(conf: Tensor, threshold: float, finished: Tensor) -> bool:
    return bool(((conf > threshold) | finished).all())


def decode_calm(stack: LayerStack, cfg: EarlyExitConfig, input_ids: Tensor, masks: MaskBook, sink: TokenSink,
                stats: DecodeStats) -> DynamicCache:
    """CALM greedy decoding of ``input_ids`` ``[B, P]`` into ``sink`` (prefill at full depth; the first token
    follows the same exit rule on the last prompt position's per-layer states)."""
    num_layers = stack.num_layers
    candidates = set(candidate_layers(stack, cfg))
    cache = stack.new_cache()
    prompt_len = input_ids.shape[1]
    mask = masks.upto(prompt_len)
    states = [stack.embed(input_ids, 0, mask)]
    for layer in range(num_layers):
        states.append(stack.run(states[-1], layer, layer + 1, cache, mask))
    threshold = calm_threshold(cfg, 0, sink.max_new_tokens)
    token, exit_at = None, num_layers
    for layer in sorted(candidates):
        conf, logits = _confidence(stack, cfg, states[layer][:, -1:], states[layer - 1][:, -1:], layer)
        stats.head_calls += logits is not None
        if _confident(conf, threshold, sink.finished):
            exit_at = layer
            token = (logits if logits is not None else stack.logits(states[layer][:, -1:], layer)[:, -1]).argmax(-1)
            break
    if token is None:
        token = stack.logits(states[num_layers][:, -1:], num_layers)[:, -1].argmax(-1)
    x = sink.push(token, exit_at)[:, None]
    length = prompt_len
    while not sink.done:
        threshold = calm_threshold(cfg, sink.count, sink.max_new_tokens)
        stats.thresholds.append(threshold)
        mask = masks.upto(length + 1)
        h, prev = stack.embed(x, length, mask), None
        token, exit_at = None, num_layers
        for layer in range(num_layers):  # `layer` blocks done
            if layer in candidates:
                conf, logits = _confidence(stack, cfg, h, prev, layer)
                stats.head_calls += logits is not None
                if _confident(conf, threshold, sink.finished):
                    stack.propagate(h, layer, num_layers, cache, mask)
                    stats.kv_projections += num_layers - layer
                    exit_at = layer
                    token = (logits if logits is not None else stack.logits(h, layer)[:, -1]).argmax(-1)
                    break
            prev, h = h, stack.run(h, layer, layer + 1, cache, mask)
            stats.block_tokens += 1
        if token is None:
            token = stack.logits(h, num_layers)[:, -1].argmax(-1)
            stats.head_calls += 1
        stats.steps += 1
        length += 1
        x = sink.push(token, exit_at)[:, None]
    return cache
