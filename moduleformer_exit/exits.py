"""Intermediate exit heads on a causal LM: exit logits, ACD / single-exit outputs, the exit training loss, freezing.

``MultiExitMixin`` goes before a transformers LM class whose backbone (the decoder, for T5) exposes ``hidden_states``
with L + 1 entries (the last one already final-normed) and a shared final norm (``ln_f``; Llama ``model.norm``; T5
``decoder.final_layer_norm``):

    exit_k     = head_k(s * ln_f(hidden_states[k]))   for 1 <= k < L
    exit_L     = head_L(s * hidden_states[L])         (already normed)
    "original" = lm_head(s * hidden_states[L])        (the model's normal logits)

with ``s = 1`` except for T5 with tied embeddings (``s = d_model ** -0.5``, as T5 scales its own output).

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
from .plain_modules import is_plain, no_global_hooks

HEAD_PREFIX = "name_to_lm_exit_head."
EXIT_LOSS_WEIGHTINGS = ("sum", "calm")
EXIT_LOSSES = ("ce", "shallow_deep", "layerskip")
# Loss settings stored in the model config (config.json), with their defaults: autocontrastive-gen's loss (the sum of
# the exits' CEs, the original head excluded) unless a recipe asks for the joint pretraining loss. ``exit_loss``
# picks the formula (see MultiExitMixin.combine_losses); the other keys parametrise FREE's shallow-deep loss
# (``shallow_exit``, ``kd_alpha``), LayerSkip's early-exit loss (``exit_loss_scale``, ``exit_loss_e_scale``) and
# LayerSkip's layer dropout (``layer_dropout`` = p_max, ``layer_dropout_scale``; training mode only, any loss).
LOSS_CONFIG_DEFAULTS = {"lm_loss_weight": 0.0, "exit_loss_weight": 1.0, "exit_loss_weighting": "sum",
                        "exit_loss": "ce", "shallow_exit": None, "kd_alpha": 0.5, "exit_loss_scale": "sum_l",
                        "exit_loss_e_scale": 1.0, "layer_dropout": 0.0, "layer_dropout_scale": "exp"}


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
        _validate_loss_config(config, self.exit_layer_count(config))
        super().__init__(config, *args, **kwargs)
        # transformers picks the loss from the class-name suffix ("...ForCausalLM"); ours are causal LMs too
        self.loss_type = "ForCausalLM"
        num_layers, hidden = self.exit_layer_count(config), config.hidden_size
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
        self._layer_dropout_hooks = self._enable_layer_dropout()

    def _enable_layer_dropout(self) -> list:
        """LayerSkip's per-sample layer dropout on the backbone's blocks (``config.layer_dropout`` > 0; acts in
        training mode only). Returns the hook handles."""
        if not self.config.layer_dropout:
            return []
        from .early_exit.losses import enable_layer_dropout, layer_dropout_rates

        rates = layer_dropout_rates(self.num_exit_layers, float(self.config.layer_dropout),
                                    self.config.layer_dropout_scale)
        blocks = next(getattr(self.backbone, name) for name in ("h", "layers", "block") if hasattr(self.backbone, name))
        return enable_layer_dropout(blocks, rates)

    # ----------------------------------------------------------------------------------------------- set-up
    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        casts = getattr(self, "name_to_conv_matrix", None)
        if casts is not None and any(module is cast for cast in casts.values()):
            init.eye_(module.weight)  # transformers' helper: skipped for weights loaded from a checkpoint

    @staticmethod
    def exit_layer_count(config) -> int:
        """L, the number of blocks exits count (the decoder's, for an encoder-decoder model)."""
        return config.num_hidden_layers

    @property
    def num_exit_layers(self) -> int:
        """L for this model (:meth:`exit_layer_count`): exits are 1..L, exit L is the top layer."""
        return self.exit_layer_count(self.config)

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
        _validate_loss_config(self.config, self.num_exit_layers)

    def _check_requested_layers(self, multi_exit_config: MultiExitConfiguration) -> None:
        num_layers = self.num_exit_layers
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

    def exit_hidden_states(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None) -> tuple[Tensor, ...]:
        """The L + 1 hidden states ``[B, T, D]`` exits read, for teacher-forced text ``input_ids`` ``[B, T]``."""
        return self.backbone(input_ids, attention_mask=attention_mask, output_hidden_states=True,
                             use_cache=False).hidden_states

    def scale_exit_input(self, h: Tensor) -> Tensor:
        """What the model does to its normed top state before ``lm_head``, applied to every exit (identity; T5
        with tied embeddings overrides it with the ``d_model ** -0.5`` rescale)."""
        return h

    def _exit_projection(self, hidden_states: tuple[Tensor, ...], layer) -> tuple[Tensor, nn.Module]:
        """``(h, head)`` with ``exit_logits(layer) == head(h).float()``: the normed (and, in the cast mode, cast)
        hidden state of exit ``layer`` (int, or ``'original'``) and the vocabulary projection it goes through."""
        num_layers = self.num_exit_layers
        if layer == ORIGINAL:
            return self.scale_exit_input(hidden_states[num_layers]), self.lm_head
        h = hidden_states[layer]
        if layer < num_layers:
            h = self.final_norm()(h)
        mode = self.multi_exit_config.vocab_projection_mode
        if mode is VocabularyProjectionMode.LAYER_SPECIFIC_PROJECTION:
            return self.scale_exit_input(h), self.name_to_lm_exit_head[f"lm_head_{layer}"]
        if mode is VocabularyProjectionMode.SHARED_PROJECTION_CAST_OUTPUTS and layer != num_layers:
            h = self.name_to_conv_matrix[f"{layer}_to_{num_layers}"](h)
        return self.scale_exit_input(h), self.lm_head

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
        # the lower head's rows are read directly, so only a plain nn.Linear qualifies (see plain_modules: ZeRO-3
        # partitioned, PEFT-wrapped, quantised or hooked heads must see their forward called)
        if cfg.contrast_function is not None or not (is_plain(head_low, nn.Linear) and no_global_hooks()):
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
        """``{layer: cross-entropy of exit layer}`` for every exit, with the model's own token loss
        (:meth:`token_loss`)."""
        return {k: self.token_loss(self.exit_logits(hidden_states, k), labels, num_items_in_batch)
                for k in self.exit_layers}

    def token_loss(self, logits: Tensor, labels: Tensor, num_items_in_batch: Optional[Tensor | int] = None) -> Tensor:
        """The model's LM loss of ``logits`` ``[B, T, V]`` against ``labels`` ``[B, T]`` (-100 ignored): the shifted
        causal-LM cross-entropy (T5 overrides it with its unshifted one)."""
        return self.loss_function(logits, labels, self.config.vocab_size, num_items_in_batch=num_items_in_batch)

    def combine_losses(self, lm_loss: Tensor, exit_losses: dict[int, Tensor],
                       aux_loss: Optional[Tensor] = None, hidden_states: Optional[tuple[Tensor, ...]] = None,
                       labels: Optional[Tensor] = None) -> Tensor:
        """The training loss, with the formula ``config.exit_loss`` names and weights from the model config.

        ``"ce"`` (default)::

            loss = lm_loss_weight * lm_loss + exit_loss_weight * sum_k c_k * exit_losses[k] + aux_loss_weight * aux

        ``c_k = 1`` (``exit_loss_weighting="sum"``, autocontrastive-gen's loss with the defaults ``lm_loss_weight=0``,
        ``exit_loss_weight=1``) or CALM's ``c_k = k / sum_j j`` (``"calm"``). A model without exits trains its
        original head (``lm_loss``).

        ``"shallow_deep"`` (FREE): ``(S * CE_S + L * lm_loss) / (S + L) + kd_alpha * KD + aux_loss_weight * aux``
        with S = ``shallow_exit`` and KD FREE's dynamic hidden-state distillation (needs ``hidden_states`` [L + 1
        states] and ``labels``; see :func:`~moduleformer_exit.early_exit.losses.shallow_deep_loss`).

        ``"layerskip"``: ``sum_l w_l * CE_l + aux_loss_weight * aux`` over the exits and the original head (layer L),
        ``w`` = LayerSkip's ``exit_loss_scale`` weights with ``exit_loss_e_scale`` on the non-final layers,
        normalised to sum 1 (:func:`~moduleformer_exit.early_exit.losses.early_exit_loss_weights`).

        ``aux_loss_weight`` is the ModuleFormer config's (0 for GPT-2 / GPT-Neo).
        """
        cfg = self.config
        kind = getattr(cfg, "exit_loss", "ce")
        num_layers = self.num_exit_layers
        exit_losses = {k: v for k, v in exit_losses.items() if k != num_layers or kind == "ce"}
        if kind == "shallow_deep":
            from .early_exit.losses import shallow_deep_loss

            if hidden_states is None or labels is None:
                raise ValueError("exit_loss='shallow_deep' needs the hidden states and labels (pass labels to the "
                                 "forward).")
            loss = shallow_deep_loss(self, hidden_states, labels, int(cfg.shallow_exit), float(cfg.kd_alpha),
                                     ce_shallow=exit_losses.get(int(cfg.shallow_exit)), ce_deep=lm_loss)["loss"]
        elif kind == "layerskip":
            from .early_exit.losses import layerskip_loss

            loss = layerskip_loss(exit_losses, lm_loss, num_layers, cfg.exit_loss_scale, float(cfg.exit_loss_e_scale))
        elif not exit_losses:
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

    # kwargs generate(early_exit=...) passes on to generate_early_exit (anything else is refused, not ignored)
    EARLY_EXIT_GENERATE_KWARGS = frozenset({"attention_mask", "max_new_tokens", "eos_token_id", "pad_token_id",
                                            "generator", "calibrator", "return_dict_in_generate"})

    def generate(self, inputs: Optional[Tensor] = None, *args: Any, early_exit=None, **kwargs: Any):
        """transformers' ``generate``, or with ``early_exit=EarlyExitConfig(...)`` early-exit decoding
        (:func:`~moduleformer_exit.early_exit.generate_early_exit`): ``inputs`` / ``input_ids`` ``[B, P]``,
        ``attention_mask``, ``max_new_tokens`` (default: the generation config's, else 20), ``eos_token_id``,
        ``pad_token_id``, ``generator``, ``calibrator``; returns the sequences ``[B, P + N]`` (the
        ``EarlyExitOutput`` with ``return_dict_in_generate=True``).

        :raises TypeError: another generation argument with ``early_exit`` (it would be ignored)."""
        if early_exit is None:
            return super().generate(inputs, *args, **kwargs)
        from .early_exit import generate_early_exit

        input_ids = kwargs.pop("input_ids", inputs)
        unknown = sorted(set(kwargs) - self.EARLY_EXIT_GENERATE_KWARGS)
        if args or unknown or input_ids is None:
            raise TypeError(f"generate(early_exit=...) takes input_ids and {sorted(self.EARLY_EXIT_GENERATE_KWARGS)}"
                            f"; got {'positional arguments, ' if args else ''}{unknown or 'no input_ids'}. The method "
                            f"and its options (sampling, gamma, thresholds) go into the EarlyExitConfig.")
        as_dict = kwargs.pop("return_dict_in_generate", False)
        if kwargs.get("max_new_tokens") is None:
            kwargs["max_new_tokens"] = getattr(self.generation_config, "max_new_tokens", None) or 20
        out = generate_early_exit(self, input_ids, early_exit, **kwargs)
        return out if as_dict else out.sequences

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
            logits = self.lm_head(self.scale_exit_input(outputs.last_hidden_state[:, keep])).float()
        loss = lm_loss = exit_losses = None
        aux_loss = getattr(outputs, "aux_loss", None)
        if labels is not None:
            lm_loss = self.token_loss(self.exit_logits(hidden_states, ORIGINAL), labels, num_items_in_batch)
            exit_losses = self.exit_losses(hidden_states, labels, num_items_in_batch)
            loss = self.combine_losses(lm_loss, exit_losses, aux_loss, hidden_states, labels)
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


def _validate_loss_config(config, num_layers: Optional[int] = None) -> None:
    """Raise ValueError naming the field if the loss settings in ``config`` are unusable."""
    if config.exit_loss_weighting not in EXIT_LOSS_WEIGHTINGS:
        raise ValueError(f"exit_loss_weighting must be one of {EXIT_LOSS_WEIGHTINGS}, got "
                         f"{config.exit_loss_weighting!r}.")
    for name in ("lm_loss_weight", "exit_loss_weight", "kd_alpha", "exit_loss_e_scale"):
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
            raise ValueError(f"{name} must be a number >= 0 (a loss weight), got {value!r}.")
    if config.exit_loss not in EXIT_LOSSES:
        raise ValueError(f"exit_loss must be one of {EXIT_LOSSES}, got {config.exit_loss!r}.")
    from .early_exit.losses import EXIT_SCALES, LAYER_DROPOUT_SCALES

    if config.exit_loss_scale not in EXIT_SCALES:
        raise ValueError(f"exit_loss_scale must be one of {EXIT_SCALES}, got {config.exit_loss_scale!r}.")
    if config.layer_dropout_scale not in LAYER_DROPOUT_SCALES:
        raise ValueError(f"layer_dropout_scale must be one of {LAYER_DROPOUT_SCALES}, got "
                         f"{config.layer_dropout_scale!r}.")
    p = config.layer_dropout
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p <= 1.0:
        raise ValueError(f"layer_dropout (LayerSkip's p_max) must be in [0, 1], got {p!r}.")
    if config.exit_loss == "shallow_deep":
        layers = getattr(config, "lm_head_layer_indices", None) or []
        num_layers = config.num_hidden_layers if num_layers is None else num_layers  # T5: the decoder's layers
        shallow = config.shallow_exit
        if not isinstance(shallow, int) or isinstance(shallow, bool) or not 1 <= shallow < num_layers \
                or shallow not in layers:
            raise ValueError(f"exit_loss='shallow_deep' needs shallow_exit = one of the exit layers below "
                             f"{num_layers} (exits: {layers}), got {shallow!r}.")
