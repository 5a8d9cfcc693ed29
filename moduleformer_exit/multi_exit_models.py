"""Multi-exit ModuleFormer / GPT-2 / GPT-Neo / Llama models (T5: ``multi_exit_t5``) and ``AutoMultiExitModel``
(autocontrastive-gen's loader)."""
from __future__ import annotations

import os
from typing import Any, Iterable, Optional

import torch
from torch import Tensor
from transformers import AutoConfig, GPT2LMHeadModel, GPTNeoForCausalLM, LlamaForCausalLM

from .exits import MultiExitCausalLMOutput, MultiExitMixin
from .hf_compat import pick_cache
from .modeling import ModuleFormerForCausalLM
from .multi_exit_config import MultiExitConfiguration, VocabularyProjectionMode
from .multi_exit_t5 import MultiExitT5


class MultiExitModuleFormer(MultiExitMixin, ModuleFormerForCausalLM):
    """ModuleFormer causal LM with exit heads (see :class:`~moduleformer_exit.exits.MultiExitMixin`)."""

    def _backbone_extra_kwargs(self, labels: Optional[Tensor]) -> dict[str, Any]:
        return {"compute_aux": self.training or labels is not None}

    def forward(
        self,
        input_ids: Optional[Tensor] = None,
        attention_mask: Optional[Tensor] = None,
        cache=None,
        inputs_embeds: Optional[Tensor] = None,
        labels: Optional[Tensor] = None,
        use_cache: Optional[bool] = None,
        output_attentions: Optional[bool] = None,
        output_hidden_states: Optional[bool] = None,
        output_router_logits: Optional[bool] = None,
        logits_to_keep: int | Tensor = 0,
        past_key_values=None,
        **kwargs: Any,
    ) -> MultiExitCausalLMOutput:
        """As :meth:`MultiExitMixin.forward`, without ``position_ids`` (ModuleFormer has no position embeddings, so
        ``generate()`` does not build them) and with ``output_router_logits`` (``router_logits`` in the output)."""
        return self._multi_exit_forward(
            input_ids, attention_mask, pick_cache(cache, past_key_values), inputs_embeds, labels, use_cache,
            output_attentions, output_hidden_states, logits_to_keep, output_router_logits=output_router_logits,
            **kwargs)


class MultiExitGPT2(MultiExitMixin, GPT2LMHeadModel):
    """GPT-2 with exit heads; loads autocontrastive-gen's ``MultiHeadGPT2`` / ``MultiExitGPT2`` checkpoints."""


class MultiExitGPTNeo(MultiExitMixin, GPTNeoForCausalLM):
    """GPT-Neo with exit heads; loads autocontrastive-gen's ``MultiHeadGPTNeo`` / ``MultiExitGPTNeo`` checkpoints."""


class MultiExitLlama(MultiExitMixin, LlamaForCausalLM):
    """Llama with exits: exit k = head_k(model.norm(h_k)) below the top layer; loads autocontrastive-gen's
    ``MultiExitLlama`` checkpoints. With ``SHARED_PROJECTION_DIRECT`` every layer exits through the model's own norm and
    ``lm_head``, which is how LayerSkip checkpoints are trained to be read early (no new heads needed)."""

    backbone_name = "model"

    def final_norm(self):
        return self.model.norm


MULTI_EXIT_CLASSES = {
    "moduleformer": MultiExitModuleFormer,
    "gpt2": MultiExitGPT2,
    "gpt_neo": MultiExitGPTNeo,
    "llama": MultiExitLlama,
    "t5": MultiExitT5,
}


class AutoMultiExitModel:
    """Loader picking the multi-exit class from the checkpoint's ``model_type`` (as autocontrastive-gen's)."""

    @staticmethod
    def from_pretrained(pretrained_model_name_or_path: str | os.PathLike,
                        multi_exit_config: Optional[MultiExitConfiguration] = None, **kwargs: Any):
        """Load a ModuleFormer, GPT-2, GPT-Neo, Llama or T5 checkpoint with its exit heads.

        ``config.json``'s ``lm_head_layer_indices`` lists the exits; a runtime ``multi_exit_config`` with its own
        ``lm_head_layer_indices`` overrides it (heads missing from the checkpoint are newly initialised, e.g. to train
        them). Every requested exit must exist (or be ``'original'``). Other kwargs go to ``from_pretrained``.
        """
        multi_exit_config = multi_exit_config or MultiExitConfiguration()
        config = kwargs.pop("config", None) or AutoConfig.from_pretrained(pretrained_model_name_or_path)
        model_class = MULTI_EXIT_CLASSES.get(config.model_type)
        if model_class is None:
            raise ValueError(
                f"AutoMultiExitModel supports model types {sorted(MULTI_EXIT_CLASSES)}, got {config.model_type!r}."
            )
        return model_class.from_pretrained(pretrained_model_name_or_path, config=config,
                                           multi_exit_config=multi_exit_config, **kwargs)

    @staticmethod
    def from_config(config, multi_exit_config: Optional[MultiExitConfiguration] = None):
        """A new (randomly initialised) multi-exit model of ``config``'s type."""
        model_class = MULTI_EXIT_CLASSES.get(config.model_type)
        if model_class is None:
            raise ValueError(
                f"AutoMultiExitModel supports model types {sorted(MULTI_EXIT_CLASSES)}, got {config.model_type!r}."
            )
        return model_class(config, multi_exit_config=multi_exit_config)


@torch.no_grad()
def fit_cast_matrices(model: MultiExitMixin, batches: Iterable[Tensor], attention_masks: Optional[Iterable] = None,
                      max_rows: int = 200_000) -> dict[int, float]:
    """Fit the CAST-mode matrices by least squares (no intercept): ``ln_f(h_k) @ W ~= hidden_states[L]``.

    ``batches`` yields ``input_ids`` ``[B, T]`` (teacher-forced text; T5: the same text is the encoder input and,
    shifted right, the decoder input); with ``attention_masks`` only real tokens are used. The fitted ``W`` is
    written into ``name_to_conv_matrix["<k>_to_<L>"].weight`` (as ``W^T``). Returns the relative residual
    ``||XW - Y|| / ||Y||`` per exit layer.
    """
    if model.multi_exit_config.vocab_projection_mode is not VocabularyProjectionMode.SHARED_PROJECTION_CAST_OUTPUTS:
        raise ValueError("fit_cast_matrices needs a model built with SHARED_PROJECTION_CAST_OUTPUTS.")
    num_layers = model.num_exit_layers
    layers = [k for k in model.exit_layers if k != num_layers]
    inputs = {k: [] for k in layers}
    targets = []
    masks = iter(attention_masks) if attention_masks is not None else None
    was_training = model.training
    model.eval()
    rows = 0
    for input_ids in batches:
        mask = next(masks) if masks is not None else None
        hidden = model.exit_hidden_states(input_ids, mask)
        keep = mask.bool() if mask is not None else torch.ones(input_ids.shape, dtype=torch.bool)
        targets.append(hidden[num_layers][keep].double())
        for k in layers:
            inputs[k].append(model.final_norm()(hidden[k])[keep].double())
        rows += int(keep.sum())
        if rows >= max_rows:
            break
    model.train(was_training)
    target = torch.cat(targets)
    residuals = {}
    for k in layers:
        x = torch.cat(inputs[k])
        solution = torch.linalg.lstsq(x, target).solution  # [d, d]: x @ W ~= target
        cast = model.name_to_conv_matrix[f"{k}_to_{num_layers}"]
        cast.weight.copy_(solution.T.to(cast.weight.dtype))
        residuals[k] = float((x @ solution - target).norm() / target.norm())
    return residuals
