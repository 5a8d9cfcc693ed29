"""Static exit: every token runs blocks [0, m) and exit m's head; blocks above m never run (no cache for them).
m = L is the own full-depth greedy loop, the baseline the other methods are timed against."""
from __future__ import annotations

from torch import Tensor

from .stack import LayerStack
from transformers.cache_utils import DynamicCache

from .state import DecodeStats, MaskBook, TokenSink


def decode_static(stack: LayerStack, input_ids: Tensor, masks: MaskBook, sink: TokenSink, stats: DecodeStats,
                  exit_layer: int) -> DynamicCache:
    """Greedy decode ``input_ids`` ``[B, P]`` with ``exit_layer`` blocks per token, writing tokens into ``sink``."""
    cache = stack.new_cache()
    x = input_ids
    length = 0
    while not sink.done:
        mask = masks.upto(length + x.shape[1])
        h = stack.run(stack.embed(x, length, mask), 0, exit_layer, cache, mask)
        length += x.shape[1]
        stats.block_tokens += exit_layer * x.shape[1] if stats.steps else 0  # prompt prefill not counted
        stats.head_calls += 1
        stats.steps += 1
        token = stack.logits(h[:, -1:], exit_layer)[:, -1].argmax(-1)
        x = sink.push(token, exit_layer)[:, None]
    return cache
