"""Loading and saving ModuleFormer checkpoints for the pruning tools (multi-exit when the checkpoint has exits)."""
from __future__ import annotations

import hashlib
import os

import torch
from torch import nn


def load_moduleformer(model_dir: str) -> nn.Module:
    """A ModuleFormer causal LM from ``model_dir``: a ``MultiExitModuleFormer`` (all exits) when ``config.json`` lists
    ``lm_head_layer_indices``, else ``ModuleFormerForCausalLM``; eval mode. Per-layer expert counts load as saved."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from .. import AutoMultiExitModel

    config = AutoConfig.from_pretrained(model_dir)
    if config.model_type != "moduleformer":
        raise ValueError(f"{model_dir} holds a {config.model_type!r} model; the pruning tools need a ModuleFormer.")
    if getattr(config, "lm_head_layer_indices", None):
        return AutoMultiExitModel.from_pretrained(model_dir).eval()
    return AutoModelForCausalLM.from_pretrained(model_dir).eval()


def save_checkpoint(model: nn.Module, out_dir: str, tokenizer=None) -> int:
    """``save_pretrained`` (safetensors) plus the tokenizer; returns the size in bytes of the weight files."""
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    return checkpoint_bytes(out_dir)


def checkpoint_bytes(model_dir: str) -> int:
    """Total size of the ``*.safetensors`` / ``*.bin`` weight files of a checkpoint directory."""
    return sum(os.path.getsize(os.path.join(model_dir, f)) for f in os.listdir(model_dir)
               if f.endswith((".safetensors", ".bin")))


def tokens_hash(blocks: torch.Tensor) -> str:
    """sha256 (first 16 hex digits) of a token tensor: identifies the calibration data in ``pruning.json``."""
    return hashlib.sha256(blocks.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()[:16]


def num_parameters(model: nn.Module) -> int:
    """All parameters of the model (exit heads included)."""
    return sum(p.numel() for p in model.parameters())
