"""FREE for a decoder-only ModuleFormer: one shallow exit S; tokens confident at S skip the deep blocks and are
queued; the next token that needs the deep model runs blocks [S, L) together with the queue in one causal forward
(synchronized parallel decoding), which writes the exact deep K/V of every queued token. Deep predictions at queued
positions give the (confidence, agree) pairs of the adaptive Beta-mixture threshold. Batch-synchronous decisions."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .beta_mixture import BetaMixtureThreshold
from .config import EarlyExitConfig
from .stack import LayerStack, softmax_margin
from transformers.cache_utils import DynamicCache

from .state import DecodeStats, MaskBook, TokenSink


def decode_free(stack: LayerStack, cfg: EarlyExitConfig, input_ids: Tensor, masks: MaskBook, sink: TokenSink,
                stats: DecodeStats, calibrator: Optional[BetaMixtureThreshold] = None,
                record_experts: bool = False) -> DynamicCache:
    """FREE greedy decoding of ``input_ids`` ``[B, P]`` into ``sink``. With ``cfg.adaptive_threshold`` the
    threshold is ``calibrator.maybe_refit()`` (once per call, FREE's per-sample schedule) and calibration pairs are
    added at every parallel deep call. The prompt is prefilled at full depth; the first token follows the same rule."""
    shallow, num_layers = int(cfg.exit_layer), stack.num_layers
    threshold = calibrator.maybe_refit() if cfg.adaptive_threshold else float(cfg.threshold)
    stats.thresholds.append(threshold)
    cache = stack.new_cache()
    prompt_len = input_ids.shape[1]
    mask = masks.upto(prompt_len)
    h = stack.run(stack.embed(input_ids, 0, mask), 0, shallow, cache, mask)
    shallow_logits = stack.logits(h[:, -1:], shallow)[:, -1]
    stats.head_calls += 1
    if bool(((softmax_margin(shallow_logits) > threshold) | sink.finished).all()):
        stack.run(h, shallow, num_layers, cache, mask)  # the prompt's deep K/V (exact)
        x = sink.push(shallow_logits.argmax(-1), shallow)[:, None]
    else:
        deep = stack.run(h, shallow, num_layers, cache, mask)
        stats.head_calls += 1
        x = sink.push(stack.logits(deep[:, -1:], num_layers)[:, -1].argmax(-1), num_layers)[:, None]
    length = prompt_len  # positions in the shallow caches before x
    queue: list[Tensor] = []  # layer-S states [B, 1, D] of tokens whose deep blocks have not run
    pend_conf: list[Tensor] = []
    pend_pred: list[Tensor] = []
    while not sink.done:
        step_mask = masks.upto(length + 1)
        h = stack.run(stack.embed(x, length, step_mask), 0, shallow, cache, step_mask)
        length += 1
        stats.block_tokens += shallow
        shallow_logits = stack.logits(h, shallow)[:, -1]
        stats.head_calls += 1
        conf, pred = softmax_margin(shallow_logits), shallow_logits.argmax(-1)
        pend_conf.append(conf)
        pend_pred.append(pred)
        stats.steps += 1
        if bool(((conf > threshold) | sink.finished).all()):
            queue.append(h)
            x = sink.push(pred, shallow)[:, None]
            continue
        batch = torch.cat(queue + [h], 1)  # [B, k + 1, D]
        route = [] if record_experts else None
        deep = stack.run(batch, shallow, num_layers, cache, masks.upto(length), route=route)
        stats.block_tokens += (num_layers - shallow) * batch.shape[1]
        stats.deep_calls += 1
        stats.catch_up_tokens += len(queue)
        experts = stack.distinct_experts(route) if route is not None else None
        if experts is not None:
            stats.verify_experts.append(experts)
        if cfg.adaptive_threshold and queue:  # FREE adds pairs only at parallel calls
            deep_pred = stack.logits(deep, num_layers).argmax(-1)  # [B, k + 1]
            stats.head_calls += batch.shape[1]
            agree = deep_pred == torch.stack(pend_pred, 1)
            live = ~sink.finished
            calibrator.add(torch.stack(pend_conf, 1)[live], agree[live])
            token = deep_pred[:, -1]
        else:
            token = stack.logits(deep[:, -1:], num_layers)[:, -1].argmax(-1)
            stats.head_calls += 1
        queue, pend_conf, pend_pred = [], [], []
        x = sink.push(token, num_layers)[:, None]
    return cache
