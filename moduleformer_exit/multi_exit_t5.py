"""``MultiExitT5``: exits on the decoder layers of transformers' T5 (autocontrastive-gen's ``MultiHeadT5`` /
``MultiExitT5``), and a ``generate()`` that also works when the decoder is deeper than the encoder.

Exit k reads the decoder state after k blocks, through ``decoder.final_layer_norm`` below the top layer (the top state
is already normed), rescaled by ``d_model ** -0.5`` when the embeddings are tied (as T5 scales its own output). The loss
is T5's: unshifted cross-entropy against ``labels`` (the decoder input is ``labels`` shifted right).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from torch import Tensor, nn
from transformers import T5ForConditionalGeneration
from transformers.cache_utils import DynamicCache, EncoderDecoderCache
from transformers.modeling_outputs import BaseModelOutput, Seq2SeqLMOutput

from .exits import MultiExitMixin
from .hf_compat import CACHE_NAME, cache_kwargs, output_cache, pick_cache, reject_unknown_kwargs
from .multi_exit_config import ORIGINAL


@dataclass
class MultiExitSeq2SeqLMOutput(Seq2SeqLMOutput):
    """T5 output with the loss parts: ``lm_loss`` (original head), ``exit_losses`` (``{layer: CE}``)."""

    lm_loss: Optional[Tensor] = None
    exit_losses: Optional[dict] = None


class MultiExitT5(MultiExitMixin, T5ForConditionalGeneration):
    """T5 with exits on its decoder (see the module docstring); runtime options as every multi-exit model."""

    backbone_name = "decoder"

    @staticmethod
    def exit_layer_count(config) -> int:
        return config.num_decoder_layers

    def final_norm(self) -> nn.Module:
        return self.decoder.final_layer_norm

    def exit_hidden_states(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None) -> tuple[Tensor, ...]:
        """Decoder hidden states ``[B, T, D]`` (L + 1) with ``input_ids`` ``[B, T]`` as the encoder input and, shifted
        right, the decoder input (teacher forcing on the same text, e.g. to fit cast matrices)."""
        encoded = self.encoder(input_ids=input_ids, attention_mask=attention_mask, return_dict=True)
        return self.decoder(input_ids=self._shift_right(input_ids), attention_mask=attention_mask,
                            encoder_hidden_states=encoded.last_hidden_state, encoder_attention_mask=attention_mask,
                            output_hidden_states=True, use_cache=False, return_dict=True).hidden_states

    def scale_exit_input(self, h: Tensor) -> Tensor:
        # transformers >= 5.x names the rescale switch scale_decoder_outputs (from tie_word_embeddings in old configs)
        scale = getattr(self.config, "scale_decoder_outputs", None)
        if scale is None:
            scale = self.config.tie_word_embeddings
        return h * (self.model_dim ** -0.5) if scale else h

    def token_loss(self, logits: Tensor, labels: Tensor, num_items_in_batch: Optional[Tensor | int] = None) -> Tensor:
        """T5's loss: unshifted mean cross-entropy of ``logits`` ``[B, T, V]`` against ``labels`` ``[B, T]``
        (-100 ignored); a sum over tokens divided by ``num_items_in_batch`` when the Trainer passes it."""
        flat_logits, flat_labels = logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1).to(logits.device)
        if num_items_in_batch is None:
            return nn.functional.cross_entropy(flat_logits, flat_labels, ignore_index=-100)
        total = nn.functional.cross_entropy(flat_logits, flat_labels, ignore_index=-100, reduction="sum")
        return total / num_items_in_batch

    def forward(
        self,
        input_ids: Optional[Tensor] = None,
        attention_mask: Optional[Tensor] = None,
        decoder_input_ids: Optional[Tensor] = None,
        decoder_attention_mask: Optional[Tensor] = None,
        encoder_outputs=None,
        cache=None,
        inputs_embeds: Optional[Tensor] = None,
        decoder_inputs_embeds: Optional[Tensor] = None,
        labels: Optional[Tensor] = None,
        use_cache: Optional[bool] = None,
        output_attentions: Optional[bool] = None,
        output_hidden_states: Optional[bool] = None,
        past_key_values=None,
        **kwargs: Any,
    ) -> MultiExitSeq2SeqLMOutput:
        """Encoder (unless ``encoder_outputs`` are given, as in ``generate()``), decoder, then the configured output
        logits ``[B, T_dec, V]`` at every decoder position. With ``labels`` ``[B, T_dec]`` the decoder input defaults
        to them shifted right and the loss is :meth:`combine_losses` of the original head's and the exits' CEs.
        The cache may be passed as ``cache=`` or ``past_key_values=``; unknown keyword arguments raise TypeError."""
        cache = pick_cache(cache, past_key_values)
        num_items_in_batch = kwargs.pop("num_items_in_batch", None)
        reject_unknown_kwargs(kwargs, f"{type(self).__name__}.forward")
        if encoder_outputs is None:
            encoder_outputs = self.encoder(input_ids=input_ids, attention_mask=attention_mask,
                                           inputs_embeds=inputs_embeds, output_attentions=output_attentions,
                                           output_hidden_states=output_hidden_states, return_dict=True)
        elif not isinstance(encoder_outputs, BaseModelOutput):
            encoder_outputs = BaseModelOutput(*encoder_outputs[:3])
        if labels is not None and decoder_input_ids is None and decoder_inputs_embeds is None:
            decoder_input_ids = self._shift_right(labels)
        need_hidden = bool(labels is not None or output_hidden_states or not self.multi_exit_config.use_original_head)
        decoded = self.decoder(input_ids=decoder_input_ids, attention_mask=decoder_attention_mask,
                               inputs_embeds=decoder_inputs_embeds, encoder_hidden_states=encoder_outputs[0],
                               encoder_attention_mask=attention_mask, use_cache=use_cache,
                               output_attentions=output_attentions, output_hidden_states=need_hidden,
                               return_dict=True, **cache_kwargs(cache))
        hidden_states = decoded.hidden_states if need_hidden else None
        if need_hidden:
            logits = self.output_logits(hidden_states)
        else:  # == exit_logits(hidden_states, "original")
            logits = self.lm_head(self.scale_exit_input(decoded.last_hidden_state)).float()
        loss = lm_loss = exit_losses = None
        if labels is not None:
            lm_loss = self.token_loss(self.exit_logits(hidden_states, ORIGINAL), labels, num_items_in_batch)
            exit_losses = self.exit_losses(hidden_states, labels, num_items_in_batch)
            loss = self.combine_losses(lm_loss, exit_losses, hidden_states=hidden_states, labels=labels)
        return MultiExitSeq2SeqLMOutput(
            loss=loss, lm_loss=lm_loss, exit_losses=exit_losses, logits=logits,
            decoder_hidden_states=hidden_states if output_hidden_states else None,
            decoder_attentions=getattr(decoded, "attentions", None),
            cross_attentions=getattr(decoded, "cross_attentions", None),
            encoder_last_hidden_state=encoder_outputs.last_hidden_state,
            encoder_hidden_states=encoder_outputs.hidden_states, encoder_attentions=encoder_outputs.attentions,
            **cache_kwargs(output_cache(decoded)),
        )

    def new_decoder_cache(self) -> EncoderDecoderCache:
        """An empty generation cache sized by the DECODER (``num_decoder_layers`` self- and cross-attention layers)."""
        return EncoderDecoderCache(DynamicCache(config=self.decoder.config), DynamicCache(config=self.decoder.config))

    def _prepare_cache_for_generation(self, generation_config, model_kwargs: dict, *args: Any, **kwargs: Any):
        """transformers' cache set-up, then the decoder-sized cache when it built a dynamic one by the encoder's depth.

        transformers 5.23 / 5.24 size ``generate()``'s cache from ``config.get_text_config(decoder=True)``, which for
        T5 is the top-level config, whose ``num_hidden_layers`` is the ENCODER depth ``num_layers``: with
        ``num_decoder_layers > num_layers`` the decoder's deeper blocks index past the cache (IndexError)."""
        result = super()._prepare_cache_for_generation(generation_config, model_kwargs, *args, **kwargs)
        cache = model_kwargs.get(CACHE_NAME)
        if (isinstance(cache, EncoderDecoderCache) and not getattr(cache, "_is_user_defined", False)
                and type(cache.self_attention_cache) is DynamicCache
                and len(cache.self_attention_cache.layers) not in (0, self.config.num_decoder_layers)
                and cache.get_seq_length() == 0):
            model_kwargs[CACHE_NAME] = self.new_decoder_cache()
        return result
