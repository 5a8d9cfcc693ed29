"""Backbone adapters of the layer-range runner: what differs between decoder-only families (embedding, per-call layer
inputs such as the 4-D mask, one block call on a per-layer cache, the K/V a skipped block would cache, final norm,
routing statistics). :class:`~.stack.LayerStack` builds every early-exit method from one adapter.

Adding a family = one :class:`BackboneAdapter` subclass + :func:`register_adapter` (e.g. a Llama adapter computes the
rotary ``position_embeddings`` once per call in :meth:`~BackboneAdapter.layer_inputs`, rotates the keys in
:meth:`~BackboneAdapter.kv`, and passes ``position_ids`` / ``position_embeddings`` to its blocks).

Masks for GPT-2 / GPT-Neo are built here (:func:`additive_causal_mask`), not with ``transformers.masking_utils``:
``create_causal_mask`` changed its signature between 5.3 (``cache_position``, ``past_key_values``) and 5.24
(``cache``, ``layer_idx``), and both releases size the mask from ONE cache layer, while FREE's deep blocks and
self-speculation's draft blocks hold other lengths than block 0. An additive float mask is what the eager and the
SDPA paths of both releases accept, and a materialised mask also keeps SDPA off its top-left-aligned ``is_causal``
path for T > 1 queries on top of a cache.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn
from transformers.cache_utils import DynamicCache

from ..hf_compat import cache_kwargs


def positions_from_mask(mask: Optional[Tensor], past: int, length: int, device: torch.device) -> Tensor:
    """Position ids ``[B or 1, length]`` of the ``length`` new slots after ``past`` cached slots, as ``generate()``
    numbers them: ``cumsum(mask) - 1`` over the real tokens (``mask`` ``[B, past + length]`` 0/1), else
    ``past .. past + length - 1``. Padded slots get 0 (their outputs are never attended to)."""
    if mask is None:
        return torch.arange(past, past + length, device=device)[None]
    positions = mask.long().cumsum(-1) - 1
    return positions.masked_fill(mask == 0, 0)[:, past: past + length]


def additive_causal_mask(mask: Optional[Tensor], past: int, length: int, dtype: torch.dtype,
                         device: torch.device) -> Optional[Tensor]:
    """``[B or 1, 1, length, past + length]`` float mask (0 = attend, ``finfo.min`` = masked) of ``length`` queries at
    slots ``past ..`` over all ``past + length`` keys: causal (bottom-right aligned) and, with ``mask`` ``[B, past +
    length]``, no attention to padded keys. None for one query without padding (it may attend to every key)."""
    if mask is None and length == 1:
        return None
    keys = past + length
    query_slot = torch.arange(past, keys, device=device)[:, None]
    allowed = (torch.arange(keys, device=device)[None, :] <= query_slot)[None, None]  # [1, 1, T, K]
    if mask is not None:
        if mask.shape[-1] != keys:
            raise ValueError(f"attention mask covers {mask.shape[-1]} slots, the blocks see {keys} (cached {past} + "
                             f"{length} new): the caches of this block range are out of step.")
        allowed = allowed & mask.bool()[:, None, None, :]
    return torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill(~allowed, torch.finfo(dtype).min)


def check_ids_in_vocab(input_ids: Tensor, vocab: int) -> None:
    """Raise ``ValueError`` naming the range when an id of ``input_ids`` (any shape) is outside ``[0, vocab)``."""
    if input_ids.numel() and (int(input_ids.min()) < 0 or int(input_ids.max()) >= vocab):
        raise ValueError(f"input ids must be in [0, {vocab}) (the embedding size), got values in "
                         f"[{int(input_ids.min())}, {int(input_ids.max())}].")


class BackboneAdapter:
    """One decoder-only family under :class:`~.stack.LayerStack`. ``blocks`` (the layers, 0-based), ``num_layers``.

    Subclasses implement :meth:`embed`, :meth:`block`, :meth:`kv`, :meth:`final_norm`; :meth:`layer_inputs` and
    :meth:`distinct_experts` have defaults (no per-call inputs beyond the 2-D mask, no experts)."""

    has_experts = False
    needs_positions = True  # embed/layer inputs use position ids (ModuleFormer: none)

    def __init__(self, model: nn.Module, backbone: nn.Module) -> None:
        self.model, self.backbone = model, backbone
        self.blocks = backbone.h
        self.num_layers = len(self.blocks)

    def embed(self, input_ids: Tensor, positions: Optional[Tensor]) -> Tensor:
        """``[B, T]`` ids at ``positions`` ``[B or 1, T]`` -> ``[B, T, D]`` block-0 inputs."""
        raise NotImplementedError

    def layer_inputs(self, hidden: Tensor, past: int, mask: Optional[Tensor], positions: Optional[Tensor]) -> Any:
        """Inputs shared by every block of one range call (computed once): ``hidden`` ``[B, T, D]``, ``past`` cached
        slots per block, ``mask`` ``[B, past + T]`` 0/1 or None, ``positions`` ``[B or 1, T]``. Default: the 2-D
        mask."""
        return mask

    def block(self, layer: int, hidden: Tensor, cache: Any, inputs: Any) -> tuple[Tensor, Optional[tuple]]:
        """Block ``layer`` on ``hidden`` ``[B, T, D]``, appending T positions to its cache layer; returns the new
        hidden state and the routing record (None without experts)."""
        raise NotImplementedError

    def kv(self, layer: int, hidden: Tensor, inputs: Any) -> tuple[Tensor, Tensor]:
        """The keys / values ``[B, H, T, hs]`` block ``layer`` would cache for input states ``hidden`` (CALM's state
        propagation: only the K/V projections of the skipped block run)."""
        raise NotImplementedError

    def final_norm(self, hidden: Tensor) -> Tensor:
        """The final norm the original head reads after the top block."""
        raise NotImplementedError

    def begin(self, input_ids: Tensor, attention_mask: Optional[Tensor]) -> tuple[Tensor, Optional[Tensor]]:
        """The decoder prompt ``[B, P]`` and its mask for a generation request (decoder-only: unchanged; an
        encoder-decoder runs its encoder here, once)."""
        return input_ids, attention_mask

    def new_cache(self) -> Any:
        """An empty per-layer KV cache for the blocks."""
        return DynamicCache(config=self.model.config)

    def self_cache(self, cache: Any) -> DynamicCache:
        """The per-layer self-attention cache inside ``cache`` (what lengths, crops and propagation act on)."""
        return cache

    def distinct_experts(self, route: list) -> Optional[float]:
        """Mean distinct experts per block over one recorded call (None for a dense backbone)."""
        return None

    def check_ids(self, input_ids: Tensor) -> None:
        """Raise ``ValueError`` for ids outside the embedding."""
        check_ids_in_vocab(input_ids, self.backbone.wte.num_embeddings)


class ModuleFormerAdapter(BackboneAdapter):
    """ModuleFormer: stick-breaking attention without position ids, blocks take the 2-D 0/1 mask; K/V are shared
    ``nn.Linear`` projections (only queries / outputs are experts)."""

    has_experts = True
    needs_positions = False

    def embed(self, input_ids: Tensor, positions: Optional[Tensor]) -> Tensor:
        self.backbone._check_input_ids(input_ids)
        return self.backbone.drop(self.backbone.wte(input_ids))

    def check_ids(self, input_ids: Tensor) -> None:
        self.backbone._check_input_ids(input_ids)

    def block(self, layer: int, hidden: Tensor, cache: Any, inputs: Any) -> tuple[Tensor, Optional[tuple]]:
        hidden, _, routing, _ = self.blocks[layer](hidden, inputs, cache, False, False)
        return hidden, routing

    def kv(self, layer: int, hidden: Tensor, inputs: Any) -> tuple[Tensor, Tensor]:
        bsz, length, _ = hidden.shape
        attn = self.blocks[layer].attn
        x = self.blocks[layer].ln_1(hidden)
        k = attn.k_proj(x).view(bsz, length, attn.n_head, attn.head_size).transpose(1, 2)
        v = attn.v_proj(x).view(bsz, length, attn.n_head, attn.head_size).transpose(1, 2)
        return k, v

    def final_norm(self, hidden: Tensor) -> Tensor:
        return self.backbone.ln_f(hidden)

    def distinct_experts(self, route: list) -> Optional[float]:
        """``route``: one ``(att_logits [N, E_att], mlp_logits [N, E_mlp])`` pair per block (eval routing = top-k)."""
        if not route:
            return None
        config = self.model.config
        counts = [att.topk(config.k_att, -1).indices.unique().numel()
                  + mlp.topk(config.k_mlp, -1).indices.unique().numel() for att, mlp in route]
        return float(sum(counts)) / len(counts)


class _LearnedPositionAdapter(BackboneAdapter):
    """GPT-2 / GPT-Neo: ``wte(ids) + wpe(positions)``, dropout, pre-LN blocks with an additive 4-D mask."""

    def embed(self, input_ids: Tensor, positions: Optional[Tensor]) -> Tensor:
        self.check_ids(input_ids)
        limit = self.backbone.wpe.num_embeddings
        if int(positions.max()) >= limit:
            raise ValueError(f"position {int(positions.max())} is beyond the model's {limit} position embeddings; "
                             f"shorten the prompt or max_new_tokens.")
        return self.backbone.drop(self.backbone.wte(input_ids) + self.backbone.wpe(positions))

    def layer_inputs(self, hidden: Tensor, past: int, mask: Optional[Tensor], positions: Optional[Tensor]) -> Any:
        return additive_causal_mask(mask, past, hidden.shape[1], hidden.dtype, hidden.device)

    def final_norm(self, hidden: Tensor) -> Tensor:
        return self.backbone.ln_f(hidden)

    @staticmethod
    def _heads(x: Tensor, heads: int) -> Tensor:
        bsz, length, width = x.shape
        return x.view(bsz, length, heads, width // heads).transpose(1, 2)


class GPT2Adapter(_LearnedPositionAdapter):
    """GPT-2 blocks (eager or SDPA attention; ``Conv1D`` fused QKV)."""

    def block(self, layer: int, hidden: Tensor, cache: Any, inputs: Any) -> tuple[Tensor, Optional[tuple]]:
        out = self.blocks[layer](hidden, attention_mask=inputs, use_cache=cache is not None, **cache_kwargs(cache))
        return (out[0] if isinstance(out, tuple) else out), None

    def kv(self, layer: int, hidden: Tensor, inputs: Any) -> tuple[Tensor, Tensor]:
        block = self.blocks[layer]
        width = block.attn.embed_dim
        proj = block.attn.c_attn  # Conv1D: x @ weight [D, 3D] + bias; only the K and V thirds are needed
        x = block.ln_1(hidden)
        k = x @ proj.weight[:, width: 2 * width] + proj.bias[width: 2 * width]
        v = x @ proj.weight[:, 2 * width:] + proj.bias[2 * width:]
        return self._heads(k, block.attn.num_heads), self._heads(v, block.attn.num_heads)


class GPTNeoAdapter(_LearnedPositionAdapter):
    """GPT-Neo blocks: global and local (sliding-window) layers; the window is applied inside the attention module on
    the full per-layer cache (bottom-right aligned), so T new queries on a cache need no extra masking here."""

    def block(self, layer: int, hidden: Tensor, cache: Any, inputs: Any) -> tuple[Tensor, Optional[tuple]]:
        out = self.blocks[layer](hidden, layer_past=cache, attention_mask=inputs, use_cache=cache is not None)
        return (out[0] if isinstance(out, tuple) else out), None

    def kv(self, layer: int, hidden: Tensor, inputs: Any) -> tuple[Tensor, Tensor]:
        attn = self.blocks[layer].attn.attention
        x = self.blocks[layer].ln_1(hidden)
        return self._heads(attn.k_proj(x), attn.num_heads), self._heads(attn.v_proj(x), attn.num_heads)


# backbone class -> adapter class; looked up along the backbone's MRO (subclasses inherit their parent's adapter)
_ADAPTERS: dict[type, Callable[[nn.Module, nn.Module], BackboneAdapter]] = {}


def register_adapter(backbone_class: type, adapter_class: Callable[[nn.Module, nn.Module], BackboneAdapter]) -> None:
    """Make :class:`~.stack.LayerStack` drive backbones of ``backbone_class`` (the model's ``transformer`` /
    ``model`` module) through ``adapter_class(model, backbone)``."""
    _ADAPTERS[backbone_class] = adapter_class


def _register_builtin() -> None:
    from transformers import GPT2Model, GPTNeoModel

    from ..modeling import ModuleFormerModel

    register_adapter(ModuleFormerModel, ModuleFormerAdapter)
    register_adapter(GPT2Model, GPT2Adapter)
    register_adapter(GPTNeoModel, GPTNeoAdapter)


_register_builtin()


def adapter_for(model: nn.Module) -> BackboneAdapter:
    """The adapter of ``model``'s backbone (``model.backbone``, else ``model.transformer`` / ``model.model``).

    :raises ValueError: no adapter is registered for the backbone's class."""
    backbone = None
    for name in ("backbone", "transformer", "model"):
        candidate = getattr(model, name, None)
        if isinstance(candidate, nn.Module):
            backbone = candidate
            break
    for cls in type(backbone).__mro__ if backbone is not None else ():
        if cls in _ADAPTERS:
            return _ADAPTERS[cls](model, backbone)
    supported = ", ".join(sorted(c.__name__ for c in _ADAPTERS))
    raise ValueError(f"early-exit decoding has no backbone adapter for {type(model).__name__} (backbone "
                     f"{type(backbone).__name__}); supported backbones: {supported}. Register one with "
                     f"moduleformer_exit.early_exit.backbones.register_adapter.")
