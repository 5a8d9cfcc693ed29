"""Intermediate exit heads on a causal LM: exit logits, ACD / single-exit outputs, the exit training loss, freezing.

``MultiExitMixin`` goes before a transformers causal-LM class whose backbone exposes ``hidden_states`` with n_layer + 1
entries (the last one already final-normed) and a final norm ``ln_f`` (ModuleFormer, GPT-2, GPT-Neo):

    exit_k     = head_k(ln_f(hidden_states[k]))   for 1 <= k < n_layer
    exit_L     = head_L(hidden_states[n_layer])   (already normed)
    "original" = lm_head(hidden_states[n_layer])  (the model's normal logits)

Parameter names follow autocontrastive-gen (``name_to_lm_exit_head.lm_head_<k>.weight``,
``name_to_conv_matrix.<k>_to_<L>.weight``), so its checkpoints load unchanged.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import initialization as init
from transformers.modeling_outputs import CausalLMOutputWithPast

from .contrast import auto_contrastive_log_probs, auto_contrastive_log_probs_at_head
from .hf_compat import cache_kwargs, output_cache, pick_cache, reject_unknown_kwargs
from .multi_exit_config import ORIGINAL, MultiExitConfiguration, VocabularyProjectionMode

HEAD_PREFIX = "name_to_lm_exit_head."
EXIT_LOSS_WEIGHTINGS = ("sum", "calm")
# Loss weights stored in the model config (config.json), with their defaults: autocontrastive-gen's loss (the sum of
# the exits' CEs, the original head excluded) unless a recipe asks for the joint pretraining loss.
LOSS_CONFIG_DEFAULTS = {"lm_loss_weight": 0.0, "exit_loss_weight": 1.0, "exit_loss_weighting": "sum"}


@dataclass
class MultiExitCausalLMOutput(CausalLMOutputWithPast):
    """Output of a multi-exit model. With ``labels``: ``lm_loss`` (the original head's shifted CE), ``exit_losses``
    (``{layer: shifted CE of exit layer}``), ``aux_loss`` (router aux loss of a ModuleFormer backbone, when computed)
    and ``loss`` combining them with the config's weights (see :meth:`MultiExitMixin.combine_losses`)."""

    lm_loss: Optional[Tensor] = None
    exit_losses: Optional[dict] = None
    aux_loss: Optional[Tensor] = None
    router_logits: Optional[tuple] = None


class MultiExitMixin:
    """Adds exit heads, ACD and exit losses to a causal LM (see the module docstring for the exit definition).

    Constructed as ``cls(config, multi_exit_config=MultiExitConfiguration(...))``; ``config.lm_head_layer_indices``
    (saved in ``config.json``) lists the exits. Runtime options live in ``self.multi_exit_config`` and can be switched
    with :meth:`set_multi_exit_config` without reloading.
    """

    backbone_name = "transformer"

    def __init__(self, config, *args: Any, multi_exit_config: Optional[MultiExitConfiguration] = None,
                 exit_loss_weighting: Optional[str] = None, **kwargs: Any) -> None:
        multi_exit_config = multi_exit_config or MultiExitConfiguration()
        if multi_exit_config.lm_head_layer_indices is not None:
            config.lm_head_layer_indices = list(multi_exit_config.lm_head_layer_indices)
        indices = getattr(config, "lm_head_layer_indices", None)
        config.lm_head_layer_indices = sorted(set(int(i) for i in indices)) if indices else []
        for name, default in LOSS_CONFIG_DEFAULTS.items():
            if getattr(config, name, None) is None:
                setattr(config, name, default)
        if exit_loss_weighting is not None:
            config.exit_loss_weighting = exit_loss_weighting
        _validate_loss_config(config)
        super().__init__(config, *args, **kwargs)
        # transformers picks the loss from the class-name suffix ("...ForCausalLM"); ours are causal LMs too
        self.loss_type = "ForCausalLM"
        num_layers, hidden = config.num_hidden_layers, config.hidden_size
        for k in config.lm_head_layer_indices:
            if not 1 <= k <= num_layers:
                raise ValueError(
                    f"Exit layer {k} in lm_head_layer_indices is out of range: this model has {num_layers} layers, "
                    f"so exits are 1..{num_layers}."
                )
        self.multi_exit_config = multi_exit_config
        mode = multi_exit_config.vocab_projection_mode
        if mode is VocabularyProjectionMode.LAYER_SPECIFIC_PROJECTION:
            self.name_to_lm_exit_head = nn.ModuleDict({
                f"lm_head_{k}": nn.Linear(hidden, config.vocab_size, bias=False) for k in config.lm_head_layer_indices
            })
        elif mode is VocabularyProjectionMode.SHARED_PROJECTION_CAST_OUTPUTS:
            self.name_to_conv_matrix = nn.ModuleDict({
                f"{k}_to_{num_layers}": nn.Linear(hidden, hidden, bias=False)
                for k in config.lm_head_layer_indices if k != num_layers
            })
            for cast in self.name_to_conv_matrix.values():
                nn.init.eye_(cast.weight)  # an unfitted cast is the identity (= logit lens)
                cast.weight.requires_grad_(False)  # fitted by least squares, never trained
        self.post_init()
        self._check_requested_layers(multi_exit_config)
        self.apply_freeze()

    # ----------------------------------------------------------------------------------------------- set-up
    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        casts = getattr(self, "name_to_conv_matrix", None)
        if casts is not None and any(module is cast for cast in casts.values()):
            init.eye_(module.weight)  # transformers' helper: skipped for weights loaded from a checkpoint

    @property
    def exit_layers(self) -> list[int]:
        """The layers with exits (``config.lm_head_layer_indices``)."""
        return list(self.config.lm_head_layer_indices)

    @property
    def exit_loss_weighting(self) -> str:
        """``"sum"`` or ``"calm"`` (``config.exit_loss_weighting``), see :meth:`combine_losses`."""
        return self.config.exit_loss_weighting

    @exit_loss_weighting.setter
    def exit_loss_weighting(self, value: str) -> None:
        self.config.exit_loss_weighting = value
        _validate_loss_config(self.config)

    def _check_requested_layers(self, multi_exit_config: MultiExitConfiguration) -> None:
        num_layers = self.config.num_hidden_layers
        mode = multi_exit_config.vocab_projection_mode
        for layer in multi_exit_config.requested_layers():
            if layer == ORIGINAL:
                continue
            if not 1 <= layer <= num_layers:
                raise ValueError(f"Exit layer {layer} is out of range: this model has {num_layers} layers (exit "
                                 f"heads at {self.exit_layers}); choose one of them or 'original'.")
            if mode is not VocabularyProjectionMode.SHARED_PROJECTION_DIRECT and layer not in self.exit_layers:
                raise ValueError(
                    f"Exit layer {layer} does not match the exit heads in the model (lm_head_layer_indices="
                    f"{self.exit_layers}); choose one of them or 'original'."
                )

    def set_multi_exit_config(self, multi_exit_config: MultiExitConfiguration) -> None:
        """Switch runtime options (original head, single exit, contrast pair, ACD parameters) in place.

        The projection mode and the exit layers are fixed at construction (they decide which parameters exist)."""
        if multi_exit_config.vocab_projection_mode is not self.multi_exit_config.vocab_projection_mode:
            raise ValueError("vocab_projection_mode is fixed when the model is built; reload to change it.")
        self._check_requested_layers(multi_exit_config)
        self.multi_exit_config = multi_exit_config
        self.apply_freeze()

    def apply_freeze(self) -> None:
        """With ``freeze_parameters``, only exit heads train; cast matrices never train. Re-applied after loading
        (transformers 5 loading resets ``requires_grad``)."""
        freeze = self.multi_exit_config.freeze_parameters
        for name, param in self.named_parameters():
            if name.startswith("name_to_conv_matrix."):
                param.requires_grad_(False)
            elif freeze:
                param.requires_grad_(name.startswith(HEAD_PREFIX))

    @classmethod
    def from_pretrained(cls, *args: Any, **kwargs: Any):
        """``from_pretrained`` that refuses missing weights and re-applies the freeze after loading.

        Missing weights are an error (:class:`~moduleformer_exit.loading.MissingWeightsError`) except the heads of
        exits the runtime ``multi_exit_config.lm_head_layer_indices`` adds to the checkpoint's own (new heads, as
        ``train-exits`` asks for)."""
        from transformers import AutoConfig

        from .loading import from_pretrained_strict

        config = kwargs.get("config")
        if config is None:
            config = AutoConfig.from_pretrained(args[0] if args else kwargs["pretrained_model_name_or_path"])
            kwargs["config"] = config
        stored = set(getattr(config, "lm_head_layer_indices", None) or [])  # before __init__ applies the runtime
        runtime = kwargs.get("multi_exit_config")
        new = sorted(set(getattr(runtime, "lm_head_layer_indices", None) or []) - stored)
        allowed = tuple(f"{HEAD_PREFIX}lm_head_{k}." for k in new) + ("name_to_conv_matrix.",)  # casts: identity
        loaded = from_pretrained_strict(
            super().from_pretrained, args, kwargs, lambda key: not key.startswith(allowed),
            "to add new exit heads on purpose, pass multi_exit_config=MultiExitConfiguration(lm_head_layer_indices="
            "...) naming them (as train-exits does).")
        model = loaded[0] if isinstance(loaded, tuple) else loaded
        model.apply_freeze()
        return loaded

    # ----------------------------------------------------------------------------------------------- exits
    @property
    def backbone(self) -> nn.Module:
        return getattr(self, self.backbone_name)

    def final_norm(self) -> nn.Module:
        """The backbone's shared final norm, applied to exits below the top layer."""
        return self.backbone.ln_f

    def _exit_projection(self, hidden_states: tuple[Tensor, ...], layer) -> tuple[Tensor, nn.Module]:
        """``(h, head)`` with ``exit_logits(layer) == head(h).float()``: the normed (and, in the cast mode, cast)
        hidden state of exit ``layer`` (int, or ``'original'``) and the vocabulary projection it goes through."""
        num_layers = self.config.num_hidden_layers
        if layer == ORIGINAL:
            return hidden_states[num_layers], self.lm_head
        h = hidden_states[layer]
        if layer < num_layers:
            h = self.final_norm()(h)
        mode = self.multi_exit_config.vocab_projection_mode
        if mode is VocabularyProjectionMode.LAYER_SPECIFIC_PROJECTION:
            return h, self.name_to_lm_exit_head[f"lm_head_{layer}"]
        if mode is VocabularyProjectionMode.SHARED_PROJECTION_CAST_OUTPUTS and layer != num_layers:
            h = self.name_to_conv_matrix[f"{layer}_to_{num_layers}"](h)
        return h, self.lm_head

    def exit_logits(self, hidden_states: tuple[Tensor, ...], layer) -> Tensor:
        """Float32 logits of exit ``layer`` (int, or ``'original'``) from the backbone's ``hidden_states``."""
        h, head = self._exit_projection(hidden_states, layer)
        return head(h).float()

    def contrast_pair_logits(self, hidden_states: tuple[Tensor, ...], upper, lower) -> tuple[Tensor, Tensor]:
        """Float32 logits ``(upper, lower)`` of two exits, ``[..., V]`` each. When both go through the same head
        (the shared-projection modes, or ``original`` vs the top exit there), their rows are projected in ONE
        matmul, so the head's weights are read once per step instead of twice (decode is bandwidth-bound)."""
        (h_up, head_up), (h_low, head_low) = (self._exit_projection(hidden_states, layer) for layer in (upper, lower))
        if head_up is not head_low or h_up.shape != h_low.shape:
            return head_up(h_up).float(), head_low(h_low).float()
        both = head_up(torch.stack((h_up, h_low))).float()  # [2, ..., V]
        return both[0], both[1]

    def output_logits(self, hidden_states: tuple[Tensor, ...]) -> Tensor:
        """The configured output: original logits, exit k's raw logits, or the contrast of two exits. Only the
        positions in ``hidden_states`` are projected (the forward passes the ``logits_to_keep`` slice: the last
        position when generating). ACD projects the lower exit only onto the upper exit's head set (its few
        candidate tokens; :func:`~moduleformer_exit.contrast.auto_contrastive_log_probs_at_head`), so a decode step
        reads one full vocabulary projection, not two."""
        cfg = self.multi_exit_config
        if cfg.use_original_head:
            return self.exit_logits(hidden_states, ORIGINAL)
        if cfg.contrast_layer_indices is None:
            return self.exit_logits(hidden_states, cfg.output_layer_index)
        (h_up, head_up), (h_low, head_low) = (self._exit_projection(hidden_states, layer)
                                              for layer in cfg.contrast_layer_indices)
        # the lower head's rows are read directly: a ZeRO-3 partitioned head (ds_id) is gathered only by its forward
        if (cfg.contrast_function is not None or not isinstance(head_low, nn.Linear)
                or hasattr(head_low.weight, "ds_id")):
            upper, lower = self.contrast_pair_logits(hidden_states, *cfg.contrast_layer_indices)
            if cfg.contrast_function is not None:
                return cfg.contrast_function(upper, lower)
            return auto_contrastive_log_probs(upper, lower, cfg.alpha, cfg.minimum_candidates)

        def lower_logits_at(ids: Optional[Tensor]) -> Tensor:  # [..., C]: the lower head's head-set rows only
            if ids is None:  # all of them
                return head_low(h_low).float()
            rows = F.embedding(ids, head_low.weight)  # [..., C, hidden]
            logits = (rows @ h_low.unsqueeze(-1)).squeeze(-1)
            return (logits if head_low.bias is None else logits + head_low.bias[ids]).float()

        return auto_contrastive_log_probs_at_head(head_up(h_up).float(), lower_logits_at, cfg.alpha,
                                                  cfg.minimum_candidates)

    def exit_losses(self, hidden_states: tuple[Tensor, ...], labels: Tensor,
                    num_items_in_batch: Optional[Tensor | int] = None) -> dict[int, Tensor]:
        """``{layer: shifted cross-entropy of exit layer}`` for every exit (the model's own causal-LM loss)."""
        return {k: self.loss_function(self.exit_logits(hidden_states, k), labels, self.config.vocab_size,
                                      num_items_in_batch=num_items_in_batch) for k in self.exit_layers}

    def combine_losses(self, lm_loss: Tensor, exit_losses: dict[int, Tensor],
                       aux_loss: Optional[Tensor] = None) -> Tensor:
        """The training loss, with weights from the model config::

            loss = lm_loss_weight * lm_loss + exit_loss_weight * sum_k c_k * exit_losses[k] + aux_loss_weight * aux

        ``c_k = 1`` (``exit_loss_weighting="sum"``, autocontrastive-gen's loss with the defaults ``lm_loss_weight=0``,
        ``exit_loss_weight=1``) or CALM's ``c_k = k / sum_j j`` (``"calm"``). A model without exits trains its
        original head (``lm_loss``). ``aux_loss_weight`` is the ModuleFormer config's (0 for GPT-2 / GPT-Neo).
        """
        cfg = self.config
        if not exit_losses:
            loss = lm_loss
        else:
            layers = sorted(exit_losses)
            coefficients = ({k: k / float(sum(layers)) for k in layers} if cfg.exit_loss_weighting == "calm"
                            else dict.fromkeys(layers, 1.0))
            loss = cfg.exit_loss_weight * sum(coefficients[k] * exit_losses[k] for k in layers)
            if cfg.lm_loss_weight:
                loss = loss + cfg.lm_loss_weight * lm_loss
        aux_weight = getattr(cfg, "aux_loss_weight", 0.0) or 0.0
        if aux_loss is not None and aux_weight > 0:
            loss = loss + aux_weight * aux_loss
        return loss

    def _backbone_extra_kwargs(self, labels: Optional[Tensor]) -> dict[str, Any]:
        """Backbone-specific forward arguments (ModuleFormer: when to compute the router aux loss)."""
        return {}

    def forward(
        self,
        input_ids: Optional[Tensor] = None,
        attention_mask: Optional[Tensor] = None,
        position_ids: Optional[Tensor] = None,
        cache=None,
        inputs_embeds: Optional[Tensor] = None,
        labels: Optional[Tensor] = None,
        use_cache: Optional[bool] = None,
        output_attentions: Optional[bool] = None,
        output_hidden_states: Optional[bool] = None,
        logits_to_keep: int | Tensor = 0,
        past_key_values=None,
        **kwargs: Any,
    ) -> MultiExitCausalLMOutput:
        """Backbone forward, then the configured output logits at every kept position (all positions unless
        ``logits_to_keep``), so generation and log-likelihood scoring both work. With ``labels`` the loss is
        :meth:`combine_losses` of the original head's and the exits' shifted CEs (the parts are in the output).
        The cache may be passed as ``cache=`` or ``past_key_values=``; unknown keyword arguments raise TypeError."""
        return self._multi_exit_forward(
            input_ids, attention_mask, pick_cache(cache, past_key_values), inputs_embeds, labels, use_cache,
            output_attentions, output_hidden_states, logits_to_keep, position_ids=position_ids, **kwargs)

    def _multi_exit_forward(self, input_ids, attention_mask, cache, inputs_embeds, labels, use_cache,
                            output_attentions, output_hidden_states, logits_to_keep, **kwargs
                            ) -> MultiExitCausalLMOutput:
        num_items_in_batch = kwargs.pop("num_items_in_batch", None)
        passed_on = {k: kwargs.pop(k) for k in ("position_ids", "token_type_ids", "output_router_logits")
                     if k in kwargs}
        backbone_kwargs = {k: v for k, v in passed_on.items() if v is not None}
        reject_unknown_kwargs(kwargs, f"{type(self).__name__}.forward")
        # The original head alone (plain decoding) needs only the last hidden state: skip recording the others.
        need_hidden = bool(labels is not None or output_hidden_states or not self.multi_exit_config.use_original_head)
        outputs = self.backbone(input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds,
                                use_cache=use_cache, output_attentions=output_attentions,
                                output_hidden_states=need_hidden, return_dict=True, **cache_kwargs(cache),
                                **backbone_kwargs, **self._backbone_extra_kwargs(labels))
        hidden_states = outputs.hidden_states if need_hidden else None
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        if need_hidden:
            logits = self.output_logits(tuple(h[:, keep] for h in hidden_states))
        else:  # == exit_logits(hidden_states, "original"): the last hidden state is already final-normed
            logits = self.lm_head(outputs.last_hidden_state[:, keep]).float()
        loss = lm_loss = exit_losses = None
        aux_loss = getattr(outputs, "aux_loss", None)
        if labels is not None:
            lm_loss = self.loss_function(self.exit_logits(hidden_states, ORIGINAL), labels, self.config.vocab_size,
                                         num_items_in_batch=num_items_in_batch)
            exit_losses = self.exit_losses(hidden_states, labels, num_items_in_batch)
            loss = self.combine_losses(lm_loss, exit_losses, aux_loss)
        return MultiExitCausalLMOutput(
            loss=loss,
            lm_loss=lm_loss,
            exit_losses=exit_losses,
            aux_loss=aux_loss,
            logits=logits,
            hidden_states=hidden_states if output_hidden_states else None,
            attentions=getattr(outputs, "attentions", None),
            router_logits=getattr(outputs, "router_logits", None),
            **cache_kwargs(output_cache(outputs)),
        )


def _validate_loss_config(config) -> None:
    """Raise ValueError naming the field if the loss weights in ``config`` are unusable."""
    if config.exit_loss_weighting not in EXIT_LOSS_WEIGHTINGS:
        raise ValueError(f"exit_loss_weighting must be one of {EXIT_LOSS_WEIGHTINGS}, got "
                         f"{config.exit_loss_weighting!r}.")
    for name in ("lm_loss_weight", "exit_loss_weight"):
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
            raise ValueError(f"{name} must be a number >= 0 (a loss weight), got {value!r}.")
