"""Decode step time against the memory-bandwidth limit: a chain of plain GEMVs over the same active weights.

A batch-1 decode step must read every active weight once (shared K/V, the k_att selected attention experts' query
and output maps, the k_mlp selected MLP experts, both routers, ``lm_head``). :func:`gemv_chain_ms` times exactly that
read as a chain of ``x @ W`` over freshly allocated matrices of those shapes (far larger than the caches, so it runs
at the machine's memory bandwidth): no routing, no attention, no Python per layer. The ratio
``limit_ms / decode_ms_per_token`` is how close decode gets to that limit (1.0 = no overhead at all).

Decode time per token = (greedy ``generate`` of n + 1 new tokens - of 1 new token) / n, so the prompt's prefill
cancels; the variants are interleaved and the fastest of ``repeats`` runs is kept.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch

from ..configuration import ModuleFormerConfig
from .decode import decode_model
from .timing import fastest_ms, process_settings

__all__ = ["active_weight_shapes", "gemv_chain_ms", "bench_decode_limit", "DECODE_LIMIT_COLUMNS"]

DECODE_LIMIT_COLUMNS = [("batch", "d"), ("tokens_per_s", ".1f"), ("ms_per_token", ".2f"), ("gemv_limit_ms", ".2f"),
                        ("of_limit", ".2f")]


def active_weight_shapes(config: ModuleFormerConfig) -> list[tuple[int, int]]:
    """``(in, out)`` of every matrix one token reads, in forward order (layers, then ``lm_head``)."""
    d, a, f, g, v = config.n_embd, config.att_hidden, config.ffd_hidden, config.gating_size, config.vocab_size

    def gate(e: int) -> list[tuple[int, int]]:
        return {"mlp": [(d, g), (g, e)], "linear": [(d, e)], "gmm": [(d, g), (g, e)]}[config.gate_type]

    layer = (gate(config.n_att_experts) + [(d, a)] * config.k_att + [(d, a), (d, a)] + [(a, d)] * config.k_att
             + gate(config.n_mlp_experts) + [(d, f)] * config.k_mlp + [(f, d)] * config.k_mlp)
    return layer * config.n_layer + [(d, v)]


def gemv_chain_ms(config: ModuleFormerConfig, batch: int = 1, repeats: int = 5) -> float:
    """Fastest ms of one chain of ``x @ W`` over all :func:`active_weight_shapes` (fresh fp32 matrices)."""
    gen = torch.Generator().manual_seed(0)
    mats = [torch.randn(i, o, generator=gen) / i ** 0.5 for i, o in active_weight_shapes(config)]
    inputs = {i: torch.randn(batch, i, generator=gen) for i in {m.shape[0] for m in mats}}

    def chain() -> None:
        with torch.inference_mode():
            for m in mats:
                inputs[m.shape[0]] @ m

    return fastest_ms({"chain": chain}, repeats)["chain"]


def bench_decode_limit(config: Optional[ModuleFormerConfig] = None, batch_sizes: Sequence[int] = (1, 16),
                       prompt_len: int = 32, new_tokens: int = 32, threads: int = 2, repeats: int = 3) -> list[dict]:
    """One row per batch size: ``batch, tokens_per_s, ms_per_token, gemv_limit_ms, of_limit`` (limit / decode).

    Uses ``configs/moduleformer-25m-active.json`` unless ``config`` is given; greedy ``generate`` with the KV cache.
    """
    with process_settings(threads=threads):
        model = decode_model(config)
        config = model.config
        rows = []
        for batch in batch_sizes:
            prompt = torch.randint(3, config.vocab_size, (batch, prompt_len))

            def generate(n: int) -> Callable[[], object]:
                kwargs = dict(max_new_tokens=n, min_new_tokens=n, do_sample=False,
                              pad_token_id=config.pad_token_id or 0)

                def run():
                    with torch.inference_mode():
                        model.generate(prompt, **kwargs)
                return run

            fastest = fastest_ms({"one": generate(1), "many": generate(new_tokens + 1)}, repeats)
            best = {name: ms / 1e3 for name, ms in fastest.items()}  # seconds
            per_token = (best["many"] - best["one"]) / new_tokens
            limit = gemv_chain_ms(config, batch, repeats=max(3, repeats))
            rows.append(dict(batch=batch, tokens_per_s=batch / per_token, ms_per_token=per_token * 1e3,
                             gemv_limit_ms=limit, of_limit=limit / (per_token * 1e3)))
        return rows
