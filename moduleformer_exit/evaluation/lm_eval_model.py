"""lm-eval 0.4 model type ``moduleformer-exit`` (aliases ``multi_exit``, ``multi_exit_gpt``): lm-eval's ``HFLM`` over a
multi-exit ModuleFormer / GPT-2 / GPT-Neo / Llama / T5 (lm-eval's seq2seq backend), scoring the original head, one
exit or ACD.

The multi-exit model's forward returns the configured output at every position (original logits, exit k's logits, or
ACD log-probabilities), so HFLM's own log-likelihood (``log_softmax`` of the logits; idempotent on ACD's normalised
log-probs), rolling log-likelihood and generation (``model.generate``) score exactly that output. Importing this
module registers the model type with lm-eval.
"""
from __future__ import annotations

import logging
from typing import Any, Optional, Union

import torch
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM
from lm_eval.models.utils_hf import get_dtype
from transformers import PreTrainedModel

from ..exits import MultiExitMixin
from ..multi_exit_config import MultiExitConfiguration
from ..multi_exit_models import MULTI_EXIT_CLASSES, AutoMultiExitModel
from .model_args import multi_exit_config_from_args

MODEL_TYPE = "moduleformer-exit"
logger = logging.getLogger(__name__)


def resolve_device(device: Optional[str]) -> str:
    """The device to evaluate on: ``device`` itself, except that a CUDA device without CUDA becomes ``"cpu"``
    (lm-eval's CLI passes ``cuda:0`` by default, even on a CPU-only machine)."""
    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        logger.warning("device=%s requested but CUDA is not available: evaluating on cpu.", device)
        return "cpu"
    return str(device)


def _is_encoder_decoder(pretrained: Union[str, PreTrainedModel], kwargs: dict) -> bool:
    """Whether ``pretrained`` (a model or a checkpoint directory / hub id) is an encoder-decoder (T5: lm-eval's
    ``seq2seq`` backend, continuations scored as decoder targets)."""
    if not isinstance(pretrained, str):
        return bool(getattr(pretrained.config, "is_encoder_decoder", False))
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(pretrained, revision=kwargs.get("revision", "main"),
                                        trust_remote_code=kwargs.get("trust_remote_code", False))
    return bool(getattr(config, "is_encoder_decoder", False))


@register_model(MODEL_TYPE, "multi_exit", "multi_exit_gpt")
class MultiExitLM(HFLM):
    """``HFLM`` with the multi-exit options of :class:`~moduleformer_exit.MultiExitConfiguration` as model args.

    ``pretrained``: a checkpoint directory (or hub id) of a ModuleFormer, GPT-2, GPT-Neo, Llama or T5 model, with or
    without exit heads, or a model object (a multi-exit model is switched to the requested output in place). Other
    causal LMs load through plain ``HFLM`` and support only the original head. ``use_original_head``, ``output_layer_index``,
    ``contrast_layer_indices`` (``'original;12'``), ``vocab_projection_mode``, ``alpha``, ``minimum_candidates``: see
    :mod:`moduleformer_exit.evaluation.model_args`. ``max_length``: default from the config (ModuleFormer:
    ``block_size``, its training sequence length; others: HFLM's ``n_positions`` / ``max_position_embeddings``).
    Every other HFLM argument (``batch_size``, ``dtype``, ``tokenizer``, ...) works as in ``--model hf``.
    """

    def __init__(self, pretrained: Union[str, PreTrainedModel], use_original_head: Any = None,
                 output_layer_index: Any = None, contrast_layer_indices: Any = None, vocab_projection_mode: Any = None,
                 alpha: Any = None, minimum_candidates: Any = None, device: Optional[str] = "cuda",
                 **kwargs: Any) -> None:
        options = dict(use_original_head=use_original_head, output_layer_index=output_layer_index,
                       contrast_layer_indices=contrast_layer_indices, alpha=alpha,
                       minimum_candidates=minimum_candidates)
        if isinstance(pretrained, MultiExitMixin) and vocab_projection_mode is None and all(
                v is None for v in options.values()):
            self.multi_exit_config = pretrained.multi_exit_config  # no options: score the model as configured
        else:
            if vocab_projection_mode is None and isinstance(pretrained, MultiExitMixin):
                vocab_projection_mode = pretrained.multi_exit_config.vocab_projection_mode
            self.multi_exit_config = multi_exit_config_from_args(vocab_projection_mode=vocab_projection_mode,
                                                                 **options)
            if not isinstance(pretrained, str):
                self._configure_model_object(pretrained)
        kwargs.setdefault("backend", "seq2seq" if _is_encoder_decoder(pretrained, kwargs) else "causal")
        super().__init__(pretrained=pretrained, device=resolve_device(device), **kwargs)

    def _configure_model_object(self, model: Any) -> None:
        """Switch a passed-in multi-exit model to the requested output; refuse exits on a model without them."""
        if isinstance(model, MultiExitMixin):
            model.set_multi_exit_config(self.multi_exit_config)
        elif not self.multi_exit_config.use_original_head:
            raise ValueError(
                f"pretrained={type(model).__name__} has no exit heads, so it can only be scored with its original head;"
                " load it with moduleformer_exit.AutoMultiExitModel.from_pretrained to use exits or ACD."
            )

    def _create_model(self, pretrained: str, revision: Optional[str] = "main", dtype: Any = "auto",
                      trust_remote_code: Optional[bool] = False, parallelize: Optional[bool] = False,
                      gpus: Optional[int] = None, max_memory_per_gpu: Any = None, max_cpu_memory: Any = None,
                      offload_folder: Optional[str] = "./offload", tp_plan: Any = None, peft: Optional[str] = None,
                      delta: Optional[str] = None, autogptq: Any = False, gptqmodel: Optional[bool] = False,
                      gguf_file: Optional[str] = None, quantization_config: Any = None, subfolder: str = "",
                      **kwargs: Any) -> None:
        """Load ``pretrained`` through :class:`AutoMultiExitModel` with the requested multi-exit configuration."""
        if self.config.model_type not in MULTI_EXIT_CLASSES:
            if not self.multi_exit_config.use_original_head:
                raise ValueError(
                    f"Exits and ACD need a {'/'.join(sorted(MULTI_EXIT_CLASSES))} checkpoint; {pretrained!r} has "
                    f"model_type {self.config.model_type!r}. Score it with use_original_head=true (or --model hf)."
                )
            return super()._create_model(pretrained, revision=revision, dtype=dtype,
                                         trust_remote_code=trust_remote_code, parallelize=parallelize, gpus=gpus,
                                         max_memory_per_gpu=max_memory_per_gpu, max_cpu_memory=max_cpu_memory,
                                         offload_folder=offload_folder, tp_plan=tp_plan, peft=peft, delta=delta,
                                         autogptq=autogptq, gptqmodel=gptqmodel, gguf_file=gguf_file,
                                         quantization_config=quantization_config, subfolder=subfolder, **kwargs)
        unsupported = {"peft": peft, "delta": delta, "autogptq": autogptq, "gptqmodel": gptqmodel,
                       "gguf_file": gguf_file, "tp_plan": tp_plan}
        used = [name for name, value in unsupported.items() if value]
        if used:
            raise ValueError(f"{MODEL_TYPE} does not support {', '.join(used)}; use --model hf for those.")
        model_kwargs = dict(kwargs)
        model_kwargs.update(self._get_accelerate_args(
            parallelize=parallelize, device_map=kwargs.get("device_map"), max_memory_per_gpu=max_memory_per_gpu,
            max_cpu_memory=max_cpu_memory, offload_folder=offload_folder, gpus=gpus))
        self._model = AutoMultiExitModel.from_pretrained(
            pretrained, self.multi_exit_config, config=self.config, revision=revision, dtype=get_dtype(dtype),
            trust_remote_code=trust_remote_code, subfolder=subfolder, quantization_config=quantization_config,
            **model_kwargs)

    @property
    def max_length(self) -> int:
        """Context length: the ``max_length`` model arg, else ModuleFormer's ``block_size``, else HFLM's default."""
        if self._max_length:
            return self._max_length
        if getattr(self.config, "model_type", None) == "moduleformer":
            return int(self.config.block_size)
        return super().max_length

    def get_model_info(self) -> dict:
        """HFLM's model info plus the multi-exit output being scored (``original_head``, ``layer_k``, ``a_vs_b``)."""
        info = super().get_model_info()
        info["multi_exit_output"] = self.multi_exit_config.get_description()
        return info
