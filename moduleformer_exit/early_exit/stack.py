"""The layer-range runner every early-exit method is built from: embed, run blocks [start, end) on top of a per-layer
KV cache, project K/V for skipped layers (state propagation), exit logits, per-layer cache lengths and crops.

Only ModuleFormer backbones are supported: its blocks take ``(hidden, mask, cache, compute_aux, output_attentions)``
and have no position ids, so a catch-up or verify batch over new positions needs no position bookkeeping. GPT-2 /
GPT-Neo blocks need version-specific position ids and 4-D masks; they raise a clear error here.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn
from transformers.cache_utils import DynamicCache

from ..modeling import ModuleFormerModel


class LayerStack:
    """Wraps a ModuleFormer causal LM (plain or multi-exit) in eval mode for layer-range decoding.

    ``num_layers`` = L. ``head_layers``: layers with an exit head (L always, via the original ``lm_head``)."""

    def __init__(self, model: nn.Module, shared_head: bool = False) -> None:
        backbone = getattr(model, "transformer", None)
        if not isinstance(backbone, ModuleFormerModel):
            raise ValueError(
                f"early-exit decoding supports ModuleFormer backbones (ModuleFormerForCausalLM, "
                f"MultiExitModuleFormer); "
                f"got {type(model).__name__}. GPT-2 / GPT-Neo blocks need position ids and 4-D masks per layer range, "
                f"which this runner does not build; convert the model to a ModuleFormer or decode at full depth.")
        if model.training:
            raise ValueError("early-exit decoding needs model.eval() (dropout and router sampling must be off).")
        self.model, self.backbone, self.shared_head = model, backbone, shared_head
        self.blocks = backbone.h
        self.num_layers = int(model.config.n_layer)
        trained = getattr(model, "exit_layers", None) or []
        self.head_layers = list(range(1, self.num_layers + 1)) if shared_head else sorted(set(trained))

    # ----------------------------------------------------------------------------------------------- cache
    def new_cache(self) -> DynamicCache:
        """An empty per-layer KV cache (``cache.layers[i]``, each with its own length)."""
        return DynamicCache(config=self.model.config)

    @staticmethod
    def length(cache: DynamicCache, layer: int) -> int:
        """Number of cached positions of block ``layer`` (0-based)."""
        if layer >= len(cache.layers):
            return 0
        keys = getattr(cache.layers[layer], "keys", None)
        return 0 if keys is None or keys.dim() < 2 else int(keys.shape[-2])

    def crop(self, cache: DynamicCache, length: int, layers: Optional[range] = None) -> None:
        """Truncate the given blocks' (default: all) caches to their first ``length`` positions."""
        for layer in layers if layers is not None else range(self.num_layers):
            if self.length(cache, layer) > length:  # slicing works the same on every transformers 5 release
                cache.layers[layer].keys = cache.layers[layer].keys[..., :length, :]
                cache.layers[layer].values = cache.layers[layer].values[..., :length, :]

    # ----------------------------------------------------------------------------------------------- compute
    def embed(self, input_ids: Tensor) -> Tensor:
        """``[B, T]`` ids -> ``[B, T, D]`` block-0 inputs (out-of-vocabulary ids raise ValueError)."""
        self.backbone._check_input_ids(input_ids)
        return self.backbone.drop(self.backbone.wte(input_ids))

    def run(self, hidden: Tensor, start: int, end: int, cache: Optional[DynamicCache], mask: Optional[Tensor],
            route: Optional[list] = None) -> Tensor:
        """Run blocks ``[start, end)`` on ``hidden`` ``[B, T, D]``, appending T positions to each block's cache.

        ``mask`` ``[B, C + T]`` (0/1 over the blocks' cached + new positions; all blocks in the range must have the
        same cache length C) or None. ``route``: a list that receives each block's (att, mlp) router logits."""
        for layer in range(start, end):
            hidden, _, routing, _ = self.blocks[layer](hidden, mask, cache, False, False)
            if route is not None:
                route.append(routing)
        return hidden

    def propagate(self, hidden: Tensor, start: int, end: int, cache: DynamicCache) -> None:
        """CALM state propagation: append ``k_proj_j(ln_1_j(hidden))``, ``v_proj_j(...)`` to blocks ``[start, end)``.

        ``hidden`` ``[B, T, D]`` (the exit state; only the K/V projections of the skipped blocks run)."""
        bsz, length, _ = hidden.shape
        for layer in range(start, end):
            attn = self.blocks[layer].attn
            x = self.blocks[layer].ln_1(hidden)
            k = attn.k_proj(x).view(bsz, length, attn.n_head, attn.head_size).transpose(1, 2)
            v = attn.v_proj(x).view(bsz, length, attn.n_head, attn.head_size).transpose(1, 2)
            cache.update(k, v, layer)

    def logits(self, hidden: Tensor, layer: int) -> Tensor:
        """Float32 logits ``[B, T, V]`` of exit ``layer`` from the state after ``layer`` blocks (not yet normed).

        ``layer == L``: the model's original head ``lm_head(ln_f(h))`` (what plain ``generate`` uses). Below L: the
        trained exit head ``head_k(ln_f(h))`` or, with ``shared_head`` and no trained head, ``lm_head(ln_f(h))``."""
        normed = self.backbone.ln_f(hidden)
        if layer == self.num_layers:
            return self.model.lm_head(normed).float()
        trained = getattr(self.model, "exit_layers", None) or []
        if layer in trained:
            # exit_logits applies ln_f itself below the top layer; it indexes hidden_states by layer.
            return self.model.exit_logits({layer: hidden}, layer)
        if not self.shared_head:
            raise ValueError(f"exit layer {layer} has no exit head; pass shared_head=True for ln_f + lm_head.")
        return self.model.lm_head(normed).float()


def softmax_margin(logits: Tensor) -> Tensor:
    """Top-1 minus top-2 probability ``[...]`` of ``logits`` ``[..., V]`` (CALM / FREE softmax confidence)."""
    top = torch.softmax(logits.float(), dim=-1).topk(2, dim=-1).values
    return top[..., 0] - top[..., 1]


def distinct_experts(route: list, top_k_att: int, top_k_mlp: int) -> float:
    """Mean over the recorded blocks of the distinct (attention + MLP) experts selected by any token of a call.

    ``route``: one ``(att_logits [N, E_att], mlp_logits [N, E_mlp])`` pair per block (eval routing = top-k)."""
    if not route:
        return 0.0
    counts = [att.topk(top_k_att, -1).indices.unique().numel() + mlp.topk(top_k_mlp, -1).indices.unique().numel()
              for att, mlp in route]
    return float(sum(counts)) / len(counts)
