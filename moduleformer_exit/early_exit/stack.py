"""The layer-range runner every early-exit method is built from: embed, run blocks [start, end) on top of a per-layer
KV cache, project K/V for skipped layers (state propagation), exit logits, per-layer cache lengths and crops.

What differs between backbone families (position ids, the 4-D mask, block signatures, K/V projections) lives in one
:class:`~.backbones.BackboneAdapter` per family (ModuleFormer, GPT-2, GPT-Neo; :func:`~.backbones.register_adapter`
adds more). Every block range gets the position ids and the mask of ITS cache length: FREE's deep blocks and the
draft blocks of self-speculation hold other lengths than block 0.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn
from transformers.cache_utils import DynamicCache

from ..multi_exit_config import VocabularyProjectionMode
from . import backbones_llama_t5  # noqa: F401  (registers the Llama / T5 adapters)
from .backbones import BackboneAdapter, adapter_for, positions_from_mask


class LayerStack:
    """Wraps a causal LM (plain or multi-exit ModuleFormer / GPT-2 / GPT-Neo) in eval mode for layer-range decoding.

    ``num_layers`` = L. ``head_layers``: layers with an exit head (L always, via the original ``lm_head``)."""

    def __init__(self, model: nn.Module, shared_head: bool = False) -> None:
        self.adapter: BackboneAdapter = adapter_for(model)
        if model.training:
            raise ValueError("early-exit decoding needs model.eval() (dropout and router sampling must be off).")
        self.model, self.backbone, self.shared_head = model, self.adapter.backbone, shared_head
        self.blocks = self.adapter.blocks
        self.num_layers = self.adapter.num_layers
        trained = getattr(model, "exit_layers", None) or []
        config = getattr(model, "multi_exit_config", None)
        # SHARED_PROJECTION_DIRECT exits read every layer through the model's own norm + lm_head (LayerSkip-style)
        direct = _reads_every_layer(config)
        self.head_layers = (list(range(1, self.num_layers + 1)) if shared_head or direct
                            else sorted(set(trained)))

    # ----------------------------------------------------------------------------------------------- cache
    def new_cache(self) -> DynamicCache:
        """An empty per-layer KV cache (``cache.layers[i]``, each with its own length; T5: an encoder-decoder cache
        whose self-attention part holds them)."""
        return self.adapter.new_cache()

    def length(self, cache: DynamicCache, layer: int) -> int:
        """Number of cached positions of block ``layer`` (0-based)."""
        cache = self.adapter.self_cache(cache)
        if layer >= len(cache.layers):
            return 0
        keys = getattr(cache.layers[layer], "keys", None)
        return 0 if keys is None or keys.dim() < 2 else int(keys.shape[-2])

    def crop(self, cache: DynamicCache, length: int, layers: Optional[range] = None) -> None:
        """Truncate the given blocks' (default: all) caches to their first ``length`` positions."""
        outer, cache = cache, self.adapter.self_cache(cache)
        for layer in layers if layers is not None else range(self.num_layers):
            if self.length(outer, layer) > length:  # slicing works the same on every transformers 5 release
                cache.layers[layer].keys = cache.layers[layer].keys[..., :length, :]
                cache.layers[layer].values = cache.layers[layer].values[..., :length, :]

    # ----------------------------------------------------------------------------------------------- compute
    def embed(self, input_ids: Tensor, past: int = 0, mask: Optional[Tensor] = None) -> Tensor:
        """``[B, T]`` ids at slots ``past .. past + T - 1`` -> ``[B, T, D]`` block-0 inputs. ``mask`` ``[B, past + T]``
        (0/1, or None) numbers the positions as ``generate()`` does for left padding. Bad ids raise ValueError."""
        positions = (positions_from_mask(mask, past, input_ids.shape[1], input_ids.device)
                     if self.adapter.needs_positions else None)
        return self.adapter.embed(input_ids, positions)

    def run(self, hidden: Tensor, start: int, end: int, cache: Optional[DynamicCache], mask: Optional[Tensor],
            route: Optional[list] = None) -> Tensor:
        """Run blocks ``[start, end)`` on ``hidden`` ``[B, T, D]``, appending T positions to each block's cache.

        ``mask`` ``[B, C + T]`` (0/1 over the blocks' cached + new positions; all blocks in the range must have the
        same cache length C) or None. ``route``: a list that receives each block's routing record (MoE backbones)."""
        if start >= end:
            return hidden
        past = 0 if cache is None else self.length(cache, start)
        length = hidden.shape[1]
        positions = (positions_from_mask(mask, past, length, hidden.device) if self.adapter.needs_positions
                     else None)
        inputs = self.adapter.layer_inputs(hidden, past, mask, positions)
        for layer in range(start, end):
            hidden, routing = self.adapter.block(layer, hidden, cache, inputs)
            if route is not None and routing is not None:
                route.append(routing)
        return hidden

    def propagate(self, hidden: Tensor, start: int, end: int, cache: DynamicCache,
                  mask: Optional[Tensor] = None) -> None:
        """CALM state propagation: append to blocks ``[start, end)`` the K/V each would compute from ``hidden``.

        ``hidden`` ``[B, T, D]`` (the exit state; only the K/V projections of the skipped blocks run); ``mask`` as in
        :meth:`run` (position-dependent K/V, e.g. rotary, need it)."""
        if start >= end:
            return
        past = self.length(cache, start)
        positions = (positions_from_mask(mask, past, hidden.shape[1], hidden.device) if self.adapter.needs_positions
                     else None)
        inputs = self.adapter.layer_inputs(hidden, past, mask, positions)
        for layer in range(start, end):
            k, v = self.adapter.kv(layer, hidden, inputs)
            self.adapter.self_cache(cache).update(k, v, layer)

    def distinct_experts(self, route: list) -> Optional[float]:
        """Mean distinct experts per block of one recorded call (None for dense backbones)."""
        return self.adapter.distinct_experts(route)

    def logits(self, hidden: Tensor, layer: int) -> Tensor:
        """Float32 logits ``[B, T, V]`` of exit ``layer`` from the state after ``layer`` blocks (not yet normed).

        ``layer == L``: the model's original head ``lm_head(ln_f(h))`` (what plain ``generate`` uses). Below L: the
        trained exit head ``head_k(ln_f(h))`` or, with ``shared_head`` and no trained head, ``lm_head(ln_f(h))``."""
        scale = getattr(self.model, "scale_exit_input", lambda h: h)  # T5 (tied): d_model ** -0.5
        if layer == self.num_layers:
            return self.model.lm_head(scale(self.adapter.final_norm(hidden))).float()
        trained = getattr(self.model, "exit_layers", None) or []
        config = getattr(self.model, "multi_exit_config", None)
        direct = _reads_every_layer(config)
        if layer in trained or direct:
            # exit_logits applies ln_f itself below the top layer; it indexes hidden_states by layer.
            return self.model.exit_logits({layer: hidden}, layer)
        if not self.shared_head:
            raise ValueError(f"exit layer {layer} has no exit head; pass shared_head=True for ln_f + lm_head.")
        return self.model.lm_head(scale(self.adapter.final_norm(hidden))).float()


def _reads_every_layer(config) -> bool:
    """Whether a multi-exit runtime config projects every layer through the model's own norm + lm_head."""
    return config is not None and config.vocab_projection_mode is VocabularyProjectionMode.SHARED_PROJECTION_DIRECT


def softmax_margin(logits: Tensor) -> Tensor:
    """Top-1 minus top-2 probability ``[...]`` of ``logits`` ``[..., V]`` (CALM / FREE softmax confidence)."""
    top = torch.softmax(logits.float(), dim=-1).topk(2, dim=-1).values
    return top[..., 0] - top[..., 1]
