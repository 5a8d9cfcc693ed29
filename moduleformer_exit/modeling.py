"""ModuleFormer models for transformers 5: embedding -> blocks (MoA + MoE MLP) -> final LayerNorm -> heads.

Module and parameter names equal IBM's (``transformer.h.N.attn.q_proj.experts.weight``, ``lm_head.weight``, ...), so
checkpoints written by the original code load unchanged; its unused ``attn.mask`` / ``attn.cum_weight`` buffers are
accepted and ignored.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import Tensor, nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.activations import get_activation
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import (
    MoeCausalLMOutputWithPast,
    MoeModelOutputWithPast,
    SequenceClassifierOutputWithPast,
)
from transformers.utils import can_return_tuple, logging
from transformers.utils.output_capturing import OutputRecorder, capture_outputs

from .accounting import flops_per_token, parameter_counts
from .attention import ModuleFormerAttention
from .configuration import ModuleFormerConfig
from .decode_step import block_decode_step, decode_step_applies
from .gates import TopKGating
from .hf_compat import cache_kwargs, output_cache, pick_cache, reject_unknown_kwargs
from .kv_cache import use_growing_layers
from .moe import MoE, ParallelExperts

logger = logging.get_logger(__name__)


def _tracing() -> bool:
    """Whether torch.compile or torch.export is tracing this forward (data-dependent host reads are not allowed)."""
    return torch.compiler.is_compiling() or torch.compiler.is_exporting()


@dataclass
class ModuleFormerModelOutput(MoeModelOutputWithPast):
    """Base-model output; ``aux_loss`` is the sum of the 2 * n_layer router losses (None when not computed).

    ``hidden_states`` has n_layer + 1 entries: [0] the embeddings, [k] the output of block k, and the last one the
    output of the final LayerNorm (so ``lm_head(hidden_states[-1]) == logits``). ``router_logits`` is a tuple with one
    ``(attention_router_logits [B*T, E_att], mlp_router_logits [B*T, E_mlp])`` pair per block (that block's
    expert counts, ``config.att_experts_at(i)`` / ``config.mlp_experts_at(i)``).
    ``attentions``: one ``[B, k_att * n_head, T, S]`` float32 tensor per block (see :class:`ModuleFormerAttention`).
    The cache is the field transformers names it (``cache`` on >= 5.24, ``past_key_values`` before).
    """

    aux_loss: Optional[Tensor] = None


@dataclass
class ModuleFormerCausalLMOutput(MoeCausalLMOutputWithPast):
    """Causal-LM output: ``loss = lm_loss + aux_loss_weight * aux_loss``; ``lm_loss`` is the shifted cross-entropy
    alone (None without labels), the quantity perplexity is computed from."""

    lm_loss: Optional[Tensor] = None


def _sum_optional(total: Optional[Tensor], value: Optional[Tensor]) -> Optional[Tensor]:
    if value is None:
        return total
    return value if total is None else total + value


def _activation(name: str) -> nn.Module:
    """transformers' activation ``name``; ``gelu_new`` (GPT-2's tanh GELU, seven elementwise ops) as the same
    function in one fused op (``gelu_pytorch_tanh``: equally close to a float64 ``gelu_new``, 4e-7)."""
    return get_activation("gelu_pytorch_tanh" if name == "gelu_new" else name)


class ModuleFormerBlock(GradientCheckpointingLayer):
    """Pre-LayerNorm block: ``x + MoA(ln_1(x))`` then ``x + MoE-MLP(ln_2(x))``."""

    def __init__(self, config: ModuleFormerConfig, layer_idx: int = 0) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd)
        self.attn = ModuleFormerAttention(config, layer_idx)
        self.ln_2 = nn.LayerNorm(config.n_embd)
        self.mlpf = MoE(
            input_size=config.n_embd,
            head_size=config.ffd_hidden,
            num_experts=config.mlp_experts_at(layer_idx),
            top_k=config.k_mlp,
            bias=False,
            activation=_activation(config.activation_function),
            gating_dropout=config.moe_pdrop,
            sample_topk=config.sample_topk,
            gating_size=config.gating_size,
            aux_loss=config.aux_loss_type,
            gate_type=config.gate_type,
            kernel_backend=config.kernel_backend,
        )
        self.resid_dropout = nn.Dropout(config.resid_pdrop)

    def _dropout(self, x: Tensor) -> Tensor:
        return self.resid_dropout(x) if self.training else x  # eval: no module call per token and layer

    def forward(
        self,
        hidden_states: Tensor,
        attention_mask: Optional[Tensor] = None,
        cache: Optional[Cache] = None,
        compute_aux: bool = True,
        output_attentions: bool = False,
    ) -> tuple[Tensor, Optional[Tensor], tuple[Tensor, Tensor], Optional[Tensor]]:
        """``hidden_states`` ``[B, T, n_embd]`` -> (new hidden states, aux loss or None, (att, mlp) router logits,
        attention weights or None). The model's output recorders read entries 0 (hidden states) and 2 (router
        logits) of this tuple, and entry 3 of the attention's. A few tokens at inference on CPU take
        :func:`~moduleformer_exit.decode_step.block_decode_step` (the same result without the submodule calls)."""
        if decode_step_applies(self, hidden_states, compute_aux, output_attentions):
            return block_decode_step(self, hidden_states, attention_mask, cache)
        attn_out, att_aux, att_logits, weights = self.attn(
            self.ln_1(hidden_states), attention_mask, cache, compute_aux, output_attentions
        )
        hidden_states = hidden_states + self._dropout(attn_out)
        mlp_out, mlp_aux, mlp_routing = self.mlpf(self.ln_2(hidden_states), compute_aux, return_routing=True)
        hidden_states = hidden_states + self._dropout(mlp_out)
        return hidden_states, _sum_optional(att_aux, mlp_aux), (att_logits, mlp_routing.logits), weights


class ModuleFormerPreTrainedModel(PreTrainedModel):
    """Weight init, checkpoint-key handling and HF integration shared by the ModuleFormer models."""

    config_class = ModuleFormerConfig
    base_model_prefix = "transformer"
    supports_gradient_checkpointing = True
    _no_split_modules = ["ModuleFormerBlock"]
    _skip_keys_device_placement = ["past_key_values", "cache"]
    # The attention is hand-written (stick-breaking has no SDPA / flash equivalent); the eager path is the only one.
    _supports_sdpa = False
    _supports_flash_attn = False
    _supports_flex_attn = False
    # IBM's checkpoints store two persistent mask buffers per layer that the forward never reads.
    _keys_to_ignore_on_load_unexpected = [r"attn\.mask$", r"attn\.cum_weight$"]
    # transformers' output capture (hooks), used by ModuleFormerModel.forward's @capture_outputs.
    _can_record_outputs = {
        "hidden_states": OutputRecorder(ModuleFormerBlock, index=0),
        # recorded from the block (which returns the attention weights as entry 3): transformers keeps a recorder's
        # hooks once installed, and a hook on the attention module would keep the block decode step off for good
        "attentions": OutputRecorder(ModuleFormerBlock, index=3),
        "router_logits": OutputRecorder(ModuleFormerBlock, index=2),
    }

    def num_parameters(self, only_trainable: bool = False, exclude_embeddings: bool = False,
                       active: bool = False) -> int:
        """Parameter count. ``active=False``: transformers' count of this model's parameters (``exclude_embeddings``
        drops ``wte``). ``active=True``: the parameters one token's forward reads (the k_att / k_mlp selected
        experts of each layer, every router, K/V, norms, ``wte`` and ``lm_head``; exit heads not included), from
        :func:`moduleformer_exit.accounting.parameter_counts`; ``exclude_embeddings`` then drops ``wte`` and
        ``lm_head`` (nanoGPT's non-embedding count)."""
        if not active:
            return super().num_parameters(only_trainable=only_trainable, exclude_embeddings=exclude_embeddings)
        if only_trainable:
            raise ValueError("num_parameters(active=True) counts what a token reads; only_trainable does not apply.")
        counts = parameter_counts(self.config)
        return counts["active_non_embedding"] if exclude_embeddings else counts["active"]

    def flops_per_token(self, context_length: int, training: bool = False) -> int:
        """FLOPs of one token attending over ``context_length`` keys: the forward (2 x multiply-adds of the active
        path incl. attention and ``lm_head``), or forward + backward (3x) with ``training=True``. For MFU divide
        ``tokens_per_second * flops_per_token(...)`` by the device's peak FLOP/s."""
        flops = flops_per_token(self.config, context_length)
        return flops["training"] if training else flops["forward"]

    @classmethod
    def from_pretrained(cls, *args: Any, **kwargs: Any):
        """``PreTrainedModel.from_pretrained``, but a checkpoint lacking backbone or LM-head weights (a layer, an
        expert, ...) raises ``MissingWeightsError`` instead of loading them randomly; new task heads (``score``)
        are initialised as usual."""
        from .loading import from_pretrained_strict

        return from_pretrained_strict(super().from_pretrained, args, kwargs,
                                      lambda key: key.startswith(("transformer.", "lm_head.")),
                                      "a ModuleFormer's layers, experts and LM head cannot be trained from here.")

    def _init_weights(self, module: nn.Module) -> None:
        """HF init for Linear / Embedding / LayerNorm (normal(0, initializer_range), ones, zeros) plus IBM's init for
        expert tensors (U(-1/in, 1/in)) and gmm gate centroids (N(0, 1)) / temperature (0)."""
        super()._init_weights(module)
        if isinstance(module, ParallelExperts):
            bound = 1.0 / module.input_size
            init.uniform_(module.weight, -bound, bound)
            if module.bias is not None:
                bias_bound = module.input_size ** -0.5
                init.uniform_(module.bias, -bias_bound, bias_bound)
        elif isinstance(module, TopKGating) and module.gate_type == "gmm":
            init.normal_(module.expert_centroids, 0.0, 1.0)
            init.zeros_(module.temperature)


class ModuleFormerModel(ModuleFormerPreTrainedModel):
    """The ModuleFormer decoder: token embedding (no positions), ``n_layer`` blocks, final LayerNorm ``ln_f``."""

    def __init__(self, config: ModuleFormerConfig) -> None:
        super().__init__(config)
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.drop = nn.Dropout(config.embd_pdrop)
        self.h = nn.ModuleList([ModuleFormerBlock(config, layer_idx=i) for i in range(config.n_layer)])
        self.ln_f = nn.LayerNorm(config.n_embd)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.wte

    def set_input_embeddings(self, new_embeddings: nn.Embedding) -> None:
        self.wte = new_embeddings

    def _check_input_ids(self, input_ids: Tensor) -> None:
        # An out-of-range id is an opaque IndexError on CPU and a device assert on CUDA: name the problem instead.
        # On CPU the check costs a reduction; on CUDA it is an asynchronous device assert (no host sync); while
        # tracing (torch.compile / export) it is left out, as a data-dependent branch cannot be traced.
        if input_ids.numel() == 0 or _tracing():
            return
        vocab = self.config.vocab_size
        message = (f"input_ids contain a token id outside the vocabulary [0, {vocab}): check that the tokenizer "
                   f"matches this model (config.vocab_size={vocab}).")
        if input_ids.device.type != "cpu":
            torch._assert_async(((input_ids >= 0) & (input_ids < vocab)).all(), message)
            return
        low, high = int(input_ids.min()), int(input_ids.max())
        if low < 0 or high >= vocab:
            raise ValueError(message.replace("a token id", f"token id {high if high >= vocab else low}", 1))

    @capture_outputs
    def forward(
        self,
        input_ids: Optional[Tensor] = None,
        attention_mask: Optional[Tensor] = None,
        token_type_ids: Optional[Tensor] = None,
        cache: Optional[Cache] = None,
        inputs_embeds: Optional[Tensor] = None,
        use_cache: Optional[bool] = None,
        output_attentions: Optional[bool] = None,
        output_hidden_states: Optional[bool] = None,
        output_router_logits: Optional[bool] = None,
        compute_aux: Optional[bool] = None,
        past_key_values: Optional[Cache] = None,
        **kwargs: Any,
    ) -> ModuleFormerModelOutput:
        """Run the decoder over ``input_ids`` ``[B, T]`` (or ``inputs_embeds`` ``[B, T, n_embd]``).

        ``attention_mask`` ``[B, past + T]`` of 0/1 (left padding is exact: padded keys get zero weight and do not
        break the stick). ``cache`` (or its pre-5.24 name ``past_key_values``) is a transformers ``Cache`` (a
        ``DynamicCache`` is created when ``use_cache`` and none is given). ``compute_aux`` (default: in training)
        computes the router aux loss. ``output_hidden_states`` / ``output_attentions`` / ``output_router_logits``
        (defaults from the config) are recorded by transformers' output capture. Only the first
        ``config.num_hidden_layers`` blocks run (transformers' ``assistant_early_exit`` lowers it).
        Unknown keyword arguments raise ``TypeError``.
        """
        reject_unknown_kwargs(kwargs, "ModuleFormerModel.forward")
        cache = pick_cache(cache, past_key_values)
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of input_ids or inputs_embeds.")
        use_cache = self.config.use_cache if use_cache is None else use_cache
        output_attentions = self.config.output_attentions if output_attentions is None else output_attentions
        compute_aux = self.training if compute_aux is None else compute_aux
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            use_cache = False  # the backward replay would write the cache a second time
        if cache is not None and not isinstance(cache, Cache):
            raise TypeError(
                f"the cache must be a transformers Cache (e.g. DynamicCache), got {type(cache)}; "
                "legacy tuple caches are not supported by transformers 5."
            )
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        if not use_cache:
            cache = None

        if input_ids is not None:
            self._check_input_ids(input_ids)
            inputs_embeds = self.wte(input_ids)
        hidden_states = inputs_embeds
        if token_type_ids is not None:  # GPT-J legacy kept by IBM: token types reuse the word embedding
            hidden_states = hidden_states + self.wte(token_type_ids)
        hidden_states = self.drop(hidden_states)
        past = cache.get_seq_length() if cache is not None else 0
        if past == 0:
            use_growing_layers(cache)  # in-place appends instead of DynamicLayer's per-step concatenation
        attention_mask = self._prepare_attention_mask(attention_mask, hidden_states.shape[0],
                                                      past + hidden_states.shape[1])

        aux_loss = None
        for block in self.h[: self.config.n_layer]:
            hidden_states, block_aux, _, _ = block(hidden_states, attention_mask, cache, compute_aux,
                                                   output_attentions)
            aux_loss = _sum_optional(aux_loss, block_aux)
        hidden_states = self.ln_f(hidden_states)
        return ModuleFormerModelOutput(last_hidden_state=hidden_states, aux_loss=aux_loss, **cache_kwargs(cache))

    @staticmethod
    def _prepare_attention_mask(attention_mask: Optional[Tensor], batch: int, length: int) -> Optional[Tensor]:
        """Validate the 2-D 0/1 mask against ``[batch, length]`` (length = past + new; checked first, shapes
        only, so an all-ones mask of the wrong length is refused too); drop it when nothing is masked (the unmasked
        kernels are faster). The all-visible test is a host read, skipped while tracing."""
        if attention_mask is None:
            return None
        if attention_mask.dim() != 2 or tuple(attention_mask.shape) != (batch, length):
            raise ValueError(
                f"attention_mask must be 2-D [batch, past + new] = [{batch}, {length}] of 0/1, got shape "
                f"{tuple(attention_mask.shape)}."
            )
        if not _tracing() and bool(attention_mask.all()):
            return None
        return attention_mask


class ModuleFormerForCausalLM(ModuleFormerPreTrainedModel, GenerationMixin):
    """ModuleFormer with an untied ``lm_head``; logits are float32. Loss = shifted CE + aux_loss_weight * aux."""

    _tied_weights_keys = {"lm_head.weight": "transformer.wte.weight"}  # applied only if tie_word_embeddings

    def __init__(self, config: ModuleFormerConfig) -> None:
        super().__init__(config)
        self.transformer = ModuleFormerModel(config)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.post_init()

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, new_embeddings: nn.Linear) -> None:
        self.lm_head = new_embeddings

    @can_return_tuple
    def forward(
        self,
        input_ids: Optional[Tensor] = None,
        attention_mask: Optional[Tensor] = None,
        token_type_ids: Optional[Tensor] = None,
        cache: Optional[Cache] = None,
        inputs_embeds: Optional[Tensor] = None,
        labels: Optional[Tensor] = None,
        use_cache: Optional[bool] = None,
        output_attentions: Optional[bool] = None,
        output_hidden_states: Optional[bool] = None,
        output_router_logits: Optional[bool] = None,
        logits_to_keep: int | Tensor = 0,
        past_key_values: Optional[Cache] = None,
        num_items_in_batch: Optional[Tensor | int] = None,
        **kwargs: Any,
    ) -> ModuleFormerCausalLMOutput:
        """Causal-LM forward. ``labels`` ``[B, T]`` (-100 = ignored) are shifted inside (transformers' causal-LM
        loss; ``num_items_in_batch`` as the Trainer passes it); the router aux loss is computed in training or when
        labels are given, and added with ``config.aux_loss_weight`` only if > 0. ``logits_to_keep`` (int: the last
        n positions, 0 = all; or a tensor of positions) limits the logits computed. Unknown kwargs raise TypeError."""
        reject_unknown_kwargs(kwargs, f"{type(self).__name__}.forward")
        output_router_logits = (self.config.output_router_logits if output_router_logits is None
                                else output_router_logits)
        outputs = self.transformer(
            input_ids=input_ids,
            attention_mask=attention_mask,
            token_type_ids=token_type_ids,
            cache=pick_cache(cache, past_key_values),
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_attentions=self.config.output_attentions if output_attentions is None else output_attentions,
            output_hidden_states=(self.config.output_hidden_states if output_hidden_states is None
                                  else output_hidden_states),
            output_router_logits=output_router_logits,
            compute_aux=self.training or labels is not None or output_router_logits,
            return_dict=True,
        )
        hidden_states = outputs.last_hidden_state
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden_states[:, keep, :]).float()
        loss = lm_loss = None
        if labels is not None:
            lm_loss = self.loss_function(logits, labels, self.config.vocab_size, num_items_in_batch=num_items_in_batch)
            loss = lm_loss
            if self.config.aux_loss_weight > 0 and outputs.aux_loss is not None:
                loss = loss + self.config.aux_loss_weight * outputs.aux_loss
        return ModuleFormerCausalLMOutput(
            loss=loss,
            lm_loss=lm_loss,
            aux_loss=outputs.aux_loss,
            logits=logits,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            router_logits=outputs.router_logits,
            **cache_kwargs(output_cache(outputs)),
        )


class ModuleFormerForSequenceClassification(ModuleFormerPreTrainedModel):
    """ModuleFormer with a linear ``score`` head on each sequence's last real token (left or right padding).

    The last real token is found from ``attention_mask`` when given (works with ``inputs_embeds`` and when the pad id
    is also a real token, e.g. pad == eos), else from ``config.pad_token_id`` in ``input_ids``; without either, the
    last position is used (batch 1 always; larger batches with a warning). transformers'
    ``GenericForSequenceClassification`` is not used: it locates padding from ``input_ids`` only and passes
    ``position_ids``, which ModuleFormer (no position embeddings) has no use for.
    """

    def __init__(self, config: ModuleFormerConfig) -> None:
        super().__init__(config)
        self.num_labels = config.num_labels
        self.transformer = ModuleFormerModel(config)
        self.score = nn.Linear(config.n_embd, config.num_labels, bias=False)
        self.post_init()

    def _last_token_index(self, input_ids: Optional[Tensor], attention_mask: Optional[Tensor], batch_size: int,
                          length: int, device: torch.device) -> Tensor:
        """``[B]`` index of each row's rightmost real token."""
        positions = torch.arange(length, device=device)
        if attention_mask is not None:
            real = attention_mask[:, -length:].to(device) != 0
        elif input_ids is not None and self.config.pad_token_id is not None:
            real = input_ids.to(device) != self.config.pad_token_id
        else:
            if batch_size > 1:
                logger.warning_once(
                    "ModuleFormerForSequenceClassification: no attention_mask and no pad_token_id (or inputs_embeds "
                    "given), so padding cannot be located and the last position of every row is pooled. Pass "
                    "attention_mask for padded batches."
                )
            return torch.full((batch_size,), length - 1, dtype=torch.long, device=device)
        # Rightmost real position; works for left and right padding (a row with no real token pools position 0).
        return (real.long() * positions).argmax(-1)

    @can_return_tuple
    def forward(
        self,
        input_ids: Optional[Tensor] = None,
        attention_mask: Optional[Tensor] = None,
        token_type_ids: Optional[Tensor] = None,
        cache: Optional[Cache] = None,
        inputs_embeds: Optional[Tensor] = None,
        labels: Optional[Tensor] = None,
        use_cache: Optional[bool] = None,
        output_attentions: Optional[bool] = None,
        output_hidden_states: Optional[bool] = None,
        past_key_values: Optional[Cache] = None,
        **kwargs: Any,
    ) -> SequenceClassifierOutputWithPast:
        """Sequence classification / regression; the loss follows ``config.problem_type`` (HF conventions)."""
        kwargs.pop("num_items_in_batch", None)
        reject_unknown_kwargs(kwargs, f"{type(self).__name__}.forward")
        outputs = self.transformer(
            input_ids=input_ids,
            attention_mask=attention_mask,
            token_type_ids=token_type_ids,
            cache=pick_cache(cache, past_key_values),
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_attentions=self.config.output_attentions if output_attentions is None else output_attentions,
            output_hidden_states=(self.config.output_hidden_states if output_hidden_states is None
                                  else output_hidden_states),
            return_dict=True,
        )
        logits = self.score(outputs.last_hidden_state)
        batch_size, length = logits.shape[:2]
        last = self._last_token_index(input_ids, attention_mask, batch_size, length, logits.device)
        pooled = logits[torch.arange(batch_size, device=logits.device), last]
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, pooled_logits=pooled, config=self.config)
        return SequenceClassifierOutputWithPast(
            loss=loss,
            logits=pooled,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            **cache_kwargs(output_cache(outputs)),
        )
