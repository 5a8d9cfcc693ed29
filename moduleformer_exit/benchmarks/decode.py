"""Greedy-decode throughput (tokens/s) of a ModuleFormer with the KV cache through HF ``generate``."""
from __future__ import annotations

from typing import Optional

import torch

from ..configuration import ModuleFormerConfig, bundled_config_path
from ..accounting import parameter_counts
from ..modeling import ModuleFormerForCausalLM
from .timing import process_settings, time_calls


HEAD_SCALE = 20.0  # random-init heads x 20: logits of std ~9 instead of ~0.45 (bench_acd_decode)


def active_parameters(config: ModuleFormerConfig) -> int:
    """Parameters one decoded token reads (from :mod:`moduleformer_exit.accounting`): the active non-embedding
    parameters plus ``lm_head`` (of the embedding table it reads one row)."""
    return parameter_counts(config)["active_non_embedding"] + config.vocab_size * config.n_embd


def decode_model(config: Optional[ModuleFormerConfig] = None) -> ModuleFormerForCausalLM:
    """The decode benchmarks' model: ``config`` or ``configs/moduleformer-25m-active.json``, seeded, in eval mode."""
    config = config or ModuleFormerConfig.from_json_file(bundled_config_path("moduleformer-25m-active"))
    torch.manual_seed(0)
    return ModuleFormerForCausalLM(config).eval()


def bench_decode(
    batch_sizes: tuple[int, ...] = (1, 16),
    prompt_len: int = 32,
    new_tokens: int = 64,
    threads: int = 2,
    config: Optional[ModuleFormerConfig] = None,
    repeats: int = 2,
) -> list[dict]:
    """Greedy ``generate`` tokens/s with the KV cache, one row per batch size (best of ``repeats`` runs).

    Uses the ~25M-active-parameter config in ``configs/moduleformer-25m-active.json`` unless ``config`` is given.
    Returns dicts with ``batch``, ``prompt_len``, ``new_tokens``, ``seconds``, ``tokens_per_s``, ``active_params``.
    """
    model = decode_model(config)
    config = model.config
    rows = []
    for batch in batch_sizes:
        prompt = torch.randint(3, config.vocab_size, (batch, prompt_len))
        kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                      pad_token_id=config.pad_token_id or 0, use_cache=True)
        with torch.inference_mode(), process_settings(threads=threads):
            model.generate(prompt, **{**kwargs, "max_new_tokens": 2, "min_new_tokens": 2})  # warm-up
            best = min(time_calls({"generate": lambda: model.generate(prompt, **kwargs)}, repeats,
                                  warmup=0)["generate"]) / 1e3
        rows.append(dict(batch=batch, prompt_len=prompt_len, new_tokens=new_tokens, seconds=best,
                         tokens_per_s=batch * new_tokens / best, active_params=active_parameters(config)))
    return rows


def bench_acd_decode(
    batch: int = 1,
    prompt_len: int = 32,
    new_tokens: int = 64,
    threads: int = 2,
    config: Optional[ModuleFormerConfig] = None,
    repeats: int = 7,
) -> list[dict]:
    """Greedy decode tokens/s with ACD vs plain greedy on the same ModuleFormer (exit heads at n_layer/2 and n_layer).

    Rows: ``plain`` (``ModuleFormerForCausalLM``), ``multi-exit original`` (the wrapper with ``use_original_head``),
    ``ACD original,L/2`` and ``ACD L,L/2``; ``overhead`` = time / plain time - 1. Runs are interleaved and the best
    of ``repeats`` is kept, so machine noise hits every row alike.

    Every vocabulary head is scaled by ``HEAD_SCALE`` so that its next-token distribution is peaked like a trained
    model's: ACD projects the lower exit only onto the upper exit's head set, a few tokens for a trained model but
    most of the vocabulary for random-init heads (whose logits are nearly flat), which would time another workload.
    """
    from ..multi_exit_config import MultiExitConfiguration
    from ..multi_exit_models import MultiExitModuleFormer

    config = config or ModuleFormerConfig.from_json_file(bundled_config_path("moduleformer-25m-active"))
    middle = max(1, config.n_layer // 2)
    torch.manual_seed(0)
    plain = ModuleFormerForCausalLM(config).eval()
    multi = MultiExitModuleFormer(config, multi_exit_config=MultiExitConfiguration(
        lm_head_layer_indices=(middle, config.n_layer))).eval()
    with torch.no_grad():  # peaked heads, as trained ones (see the docstring)
        plain.lm_head.weight.mul_(HEAD_SCALE)
        for head in multi.name_to_lm_exit_head.values():
            head.weight.mul_(HEAD_SCALE)
    multi.load_state_dict(plain.state_dict(), strict=False)
    variants = {
        "plain": (plain, None),
        "multi-exit original": (multi, MultiExitConfiguration()),
        f"ACD original,{middle}": (multi, MultiExitConfiguration(use_original_head=False,
                                                                  contrast_layer_indices=("original", middle))),
        f"ACD {config.n_layer},{middle}": (multi, MultiExitConfiguration(
            use_original_head=False, contrast_layer_indices=(config.n_layer, middle))),
    }
    prompt = torch.randint(3, config.vocab_size, (batch, prompt_len))
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                  pad_token_id=config.pad_token_id or 0)

    def run(model, runtime):
        def call():
            if runtime is not None:
                model.set_multi_exit_config(runtime)
            model.generate(prompt, **kwargs)
        return call
    with torch.inference_mode(), process_settings(threads=threads):
        times = time_calls({name: run(*variant) for name, variant in variants.items()}, repeats, warmup=0)
    best = {name: min(ms) / 1e3 for name, ms in times.items()}
    return [dict(mode=name, batch=batch, new_tokens=new_tokens, seconds=seconds,
                 tokens_per_s=batch * new_tokens / seconds, overhead=seconds / best["plain"] - 1.0)
            for name, seconds in best.items()]
