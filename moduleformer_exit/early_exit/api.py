"""``generate_early_exit``: one entry point for full / static / CALM / FREE / self-speculative decoding of a
ModuleFormer, GPT-2 or GPT-Neo causal LM (plain or multi-exit; other backbones through a registered adapter),
returning the tokens, each token's exit layer and the decode counters."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from .beta_mixture import BetaMixtureThreshold
from .calm import decode_calm
from .config import EarlyExitConfig
from .free import decode_free
from .speculative import decode_self_speculative
from .stack import LayerStack
from .state import DecodeStats, MaskBook, TokenSink
from .static import decode_static


@dataclass
class EarlyExitOutput:
    """``sequences`` ``[B, P + N]`` (prompt + new tokens, as ``generate()``), ``exit_layers`` ``[B, N]`` (blocks
    whose state produced each new token; L for the full model and for every self-speculative token, 0 on padding
    after EOS), ``stats`` (:meth:`DecodeStats.as_dict`), ``calibrator`` (FREE's adaptive threshold, to pass on),
    ``cache`` (with ``return_cache``)."""

    sequences: Tensor
    exit_layers: Tensor
    stats: dict
    calibrator: Optional[BetaMixtureThreshold] = None
    cache: Optional[object] = None


def _eos_ids(model: nn.Module, eos_token_id) -> Optional[list[int]]:
    if eos_token_id is None:
        eos_token_id = getattr(model.generation_config, "eos_token_id", None)
    if eos_token_id is None:
        return None
    return [int(eos_token_id)] if isinstance(eos_token_id, int) else [int(i) for i in eos_token_id]


@torch.no_grad()
def generate_early_exit(model: nn.Module, input_ids: Tensor, early_exit: EarlyExitConfig,
                        attention_mask: Optional[Tensor] = None, max_new_tokens: int = 20,
                        eos_token_id: Optional[int | Sequence[int]] = None, pad_token_id: Optional[int] = None,
                        generator: Optional[torch.Generator] = None,
                        calibrator: Optional[BetaMixtureThreshold] = None,
                        record_experts: bool = False, return_cache: bool = False) -> EarlyExitOutput:
    """Decode ``input_ids`` ``[B, P]`` (left padding with ``attention_mask`` ``[B, P]``) with an early-exit method.

    EOS (default: the model's ``generation_config.eos_token_id``; pass ``eos_token_id=[]`` for none) and
    ``max_new_tokens`` behave as in ``generate()``: rows that finished are padded with ``pad_token_id`` (default:
    the generation config's, else the first EOS id) and decoding stops when all rows finished. Decisions (exit /
    skip / accepted prefix) are batch-synchronous. ``generator`` drives sampling (``do_sample``). ``calibrator``:
    FREE's Beta-mixture threshold carried across calls (a new one when None and ``adaptive_threshold``).
    ``record_experts``: count distinct experts per verify / deep call (a small cost). ``return_cache``: also return
    the per-layer KV cache (it covers every position but the last emitted token; FREE's deep blocks lag by the queue).

    :raises ValueError: a layer without an exit head, a backbone without an adapter, a model in train mode, bad
        sizes, a sequence beyond the position embeddings.
    """
    if not isinstance(early_exit, EarlyExitConfig):
        raise TypeError(f"early_exit must be an EarlyExitConfig, got {type(early_exit).__name__}.")
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids must be [batch, prompt_len] with prompt_len >= 1, got {tuple(input_ids.shape)}.")
    if isinstance(max_new_tokens, bool) or int(max_new_tokens) < 1:
        raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}.")
    if attention_mask is not None and attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask {tuple(attention_mask.shape)} must match input_ids "
                         f"{tuple(input_ids.shape)}.")
    stack = LayerStack(model, shared_head=early_exit.shared_head)
    early_exit.check_model(stack.num_layers, stack.head_layers)
    input_ids, attention_mask = stack.adapter.begin(input_ids, attention_mask)  # T5: encoder once, decoder prompt
    eos = _eos_ids(model, eos_token_id)
    if pad_token_id is None:
        pad_token_id = getattr(model.generation_config, "pad_token_id", None)
        if pad_token_id is None and eos:
            pad_token_id = eos[0]
    sink = TokenSink(input_ids.shape[0], int(max_new_tokens), eos, pad_token_id, input_ids.device)
    masks = MaskBook(attention_mask)
    stats = DecodeStats()
    method = early_exit.method
    if early_exit.adaptive_threshold and calibrator is None:
        calibrator = BetaMixtureThreshold(initial_threshold=early_exit.threshold)
    if method == "full":
        cache = decode_static(stack, input_ids, masks, sink, stats, stack.num_layers)
    elif method == "static":
        cache = decode_static(stack, input_ids, masks, sink, stats, int(early_exit.exit_layer))
    elif method == "calm":
        cache = decode_calm(stack, early_exit, input_ids, masks, sink, stats)
    elif method == "free":
        cache = decode_free(stack, early_exit, input_ids, masks, sink, stats, calibrator, record_experts)
    else:
        cache = decode_self_speculative(stack, early_exit, input_ids, masks, sink, stats, generator, record_experts)
    tokens, layers = sink.result()
    summary = stats.as_dict(tokens.shape[1])
    summary["mean_exit_layer"] = float(layers[layers > 0].float().mean()) if bool((layers > 0).any()) else None
    summary["thresholds"] = stats.thresholds
    return EarlyExitOutput(torch.cat([input_ids, tokens], 1), layers, summary, calibrator,
                           cache if return_cache else None)
