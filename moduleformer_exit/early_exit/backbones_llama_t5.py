"""Backbone adapters of the layer-range runner for Llama and for the T5 decoder (registered on import).

Llama: token embedding without positions; rotary ``position_embeddings`` computed once per range call from the range's
own position ids; the keys a skipped block would cache are ``rope(k_proj(input_layernorm(h)))``.

T5 decoder: :meth:`T5DecoderAdapter.begin` runs the encoder ONCE and starts the decoder from
``decoder_start_token_id``; every range call gets the relative position bias of ITS queries (slots ``past ..``) over
its keys from block 0's bias table (blocks above 0 have none: T5 computes it in block 0 and passes it up), the
additive causal mask, and the encoder states for cross-attention (each block's cross-attention K/V are computed the
first time it runs and cached). Skipped blocks cache ``k(layer_norm(h))`` / ``v(layer_norm(h))`` of their
self-attention.
"""
from __future__ import annotations

import inspect
from typing import Any, NamedTuple, Optional

import torch
from torch import Tensor, nn
from transformers import LlamaModel
from transformers.cache_utils import DynamicCache, EncoderDecoderCache
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb
from transformers.models.t5.modeling_t5 import T5Block, T5Stack

from ..hf_compat import cache_kwargs
from .backbones import BackboneAdapter, additive_causal_mask, check_ids_in_vocab, register_adapter


# transformers < 5.2x T5 blocks take cache_position (cross-attention reads its query length from it) and use a given
# position_bias AS the full additive mask; newer ones add the mask themselves and have no cache_position.
_T5_TAKES_CACHE_POSITION = "cache_position" in inspect.signature(T5Block.forward).parameters


def _heads(x: Tensor, head_dim: int) -> Tensor:
    """``[B, T, H * hd]`` -> ``[B, H, T, hd]``."""
    bsz, length, _ = x.shape
    return x.view(bsz, length, -1, head_dim).transpose(1, 2)


class LlamaInputs(NamedTuple):
    mask: Optional[Tensor]  # [B or 1, 1, T, past + T] additive, or None
    positions: Tensor  # [B or 1, T]
    rotary: tuple[Tensor, Tensor]  # cos, sin [B or 1, T, hd]


class LlamaAdapter(BackboneAdapter):
    """Llama (and its subclasses): RMSNorm pre-norm blocks with rotary attention and grouped K/V heads."""

    def __init__(self, model: nn.Module, backbone: nn.Module) -> None:
        self.model, self.backbone = model, backbone
        self.blocks = backbone.layers
        self.num_layers = len(self.blocks)

    def check_ids(self, input_ids: Tensor) -> None:
        check_ids_in_vocab(input_ids, self.backbone.embed_tokens.num_embeddings)

    def embed(self, input_ids: Tensor, positions: Optional[Tensor]) -> Tensor:
        self.check_ids(input_ids)
        return self.backbone.embed_tokens(input_ids)

    def layer_inputs(self, hidden: Tensor, past: int, mask: Optional[Tensor], positions: Optional[Tensor]) -> Any:
        additive = additive_causal_mask(mask, past, hidden.shape[1], hidden.dtype, hidden.device)
        return LlamaInputs(additive, positions, self.backbone.rotary_emb(hidden, position_ids=positions))

    def block(self, layer: int, hidden: Tensor, cache: Any, inputs: Any) -> tuple[Tensor, Optional[tuple]]:
        out = self.blocks[layer](hidden, attention_mask=inputs.mask, position_ids=inputs.positions,
                                 use_cache=cache is not None, position_embeddings=inputs.rotary,
                                 **cache_kwargs(cache))
        return (out[0] if isinstance(out, tuple) else out), None

    def kv(self, layer: int, hidden: Tensor, inputs: Any) -> tuple[Tensor, Tensor]:
        block = self.blocks[layer]
        attn = block.self_attn
        x = block.input_layernorm(hidden)
        k, v = _heads(attn.k_proj(x), attn.head_dim), _heads(attn.v_proj(x), attn.head_dim)
        cos, sin = inputs.rotary
        _, k = apply_rotary_pos_emb(k, k, cos, sin)
        return k, v

    def final_norm(self, hidden: Tensor) -> Tensor:
        return self.backbone.norm(hidden)


class T5Inputs(NamedTuple):
    mask: Optional[Tensor]  # [B or 1, 1, T, past + T] additive (materialised: T5's SDPA path never goes is_causal)
    position_bias: Tensor  # [1 or B, H, T, past + T] (the mask added in, for blocks that take cache_position)
    encoder_states: Tensor  # [B, S, D]
    encoder_mask: Optional[Tensor]  # [B, 1, 1, S] additive, or None
    cache_position: Optional[Tensor]  # [T] slots past.. (blocks that take it), else None


class T5DecoderAdapter(BackboneAdapter):
    """The decoder stack of a multi-exit T5 (``model.backbone`` is ``model.decoder``); needs :meth:`begin`."""

    needs_positions = False

    def __init__(self, model: nn.Module, backbone: nn.Module) -> None:
        if not getattr(backbone, "is_decoder", False):
            raise ValueError("the T5 early-exit adapter drives the decoder stack (MultiExitT5.backbone).")
        self.model, self.backbone = model, backbone
        self.blocks = backbone.block
        self.num_layers = len(self.blocks)
        self.encoder_states: Optional[Tensor] = None
        self.encoder_mask: Optional[Tensor] = None

    def begin(self, input_ids: Tensor, attention_mask: Optional[Tensor]) -> tuple[Tensor, None]:
        """Run the encoder once on ``input_ids`` ``[B, S]`` (``attention_mask`` ``[B, S]`` 0/1); returns the decoder
        prompt ``[B, 1]`` (``decoder_start_token_id``, as ``generate()``) and its mask (None: no padding)."""
        self.check_ids(input_ids)
        encoded = self.model.encoder(input_ids=input_ids, attention_mask=attention_mask, return_dict=True)
        self.encoder_states = encoded.last_hidden_state
        self.encoder_mask = None
        if attention_mask is not None and not bool(attention_mask.all()):
            dtype = self.encoder_states.dtype
            self.encoder_mask = torch.zeros(attention_mask.shape, dtype=dtype, device=input_ids.device).masked_fill(
                attention_mask == 0, torch.finfo(dtype).min)[:, None, None, :]
        start = self.model.config.decoder_start_token_id
        if start is None:
            raise ValueError("early exit on T5 needs config.decoder_start_token_id (the decoder's first input).")
        return torch.full((input_ids.shape[0], 1), int(start), dtype=torch.long, device=input_ids.device), None

    def new_cache(self) -> EncoderDecoderCache:
        return self.model.new_decoder_cache()

    def self_cache(self, cache: EncoderDecoderCache) -> DynamicCache:
        return cache.self_attention_cache

    def check_ids(self, input_ids: Tensor) -> None:
        check_ids_in_vocab(input_ids, self.backbone.embed_tokens.num_embeddings)

    def embed(self, input_ids: Tensor, positions: Optional[Tensor]) -> Tensor:
        self.check_ids(input_ids)
        return self.backbone.dropout(self.backbone.embed_tokens(input_ids))

    def layer_inputs(self, hidden: Tensor, past: int, mask: Optional[Tensor], positions: Optional[Tensor]) -> Any:
        if self.encoder_states is None:
            raise RuntimeError("T5DecoderAdapter.begin(encoder input) must run before the decoder blocks.")
        length = hidden.shape[1]
        additive = additive_causal_mask(mask, past, length, hidden.dtype, hidden.device)
        if additive is None:  # one query, no padding: attends to every key
            additive = torch.zeros((1, 1, length, past + length), dtype=hidden.dtype, device=hidden.device)
        slots = torch.arange(past, past + length, device=hidden.device)
        attention = self.blocks[0].layer[0].SelfAttention  # block 0 holds the decoder's relative bias table
        if _T5_TAKES_CACHE_POSITION:
            bias = attention.compute_bias(length, past + length, device=hidden.device, cache_position=slots)
            return T5Inputs(None, bias.to(hidden.dtype) + additive, self.encoder_states, self.encoder_mask, slots)
        bias = attention.compute_bias(length, past + length, device=hidden.device, past_seen_tokens=past)
        return T5Inputs(additive, bias.to(hidden.dtype), self.encoder_states, self.encoder_mask, None)

    def block(self, layer: int, hidden: Tensor, cache: Any, inputs: Any) -> tuple[Tensor, Optional[tuple]]:
        extra = {"cache_position": inputs.cache_position, "use_cache": True} if _T5_TAKES_CACHE_POSITION else {}
        out = self.blocks[layer](hidden, attention_mask=inputs.mask, position_bias=inputs.position_bias,
                                 encoder_hidden_states=inputs.encoder_states,
                                 encoder_attention_mask=inputs.encoder_mask, **cache_kwargs(cache), **extra)
        return out[0], None

    def kv(self, layer: int, hidden: Tensor, inputs: Any) -> tuple[Tensor, Tensor]:
        sublayer = self.blocks[layer].layer[0]
        attn = sublayer.SelfAttention
        x = sublayer.layer_norm(hidden)
        return _heads(attn.k(x), attn.key_value_proj_dim), _heads(attn.v(x), attn.key_value_proj_dim)

    def final_norm(self, hidden: Tensor) -> Tensor:
        return self.backbone.dropout(self.backbone.final_layer_norm(hidden))


register_adapter(LlamaModel, LlamaAdapter)
register_adapter(T5Stack, T5DecoderAdapter)
