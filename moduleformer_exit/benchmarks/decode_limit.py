"""Decode step time against the memory-bandwidth limit: a chain of plain GEMVs over the same active weights.

A batch-1 decode step must read every active weight once (shared K/V, the k_att selected attention experts' query
and output maps, the k_mlp selected MLP experts, both routers, ``lm_head``). :func:`gemv_chain_ms` times exactly that
read as a chain of ``x @ W`` over freshly allocated matrices of those shapes (far larger than the caches, so it runs
at the machine's memory bandwidth): no routing, no attention, no Python per layer. The ratio
``limit_ms / decode_ms_per_token`` is how close decode gets to that limit (1.0 = no overhead at all).

Decode time per token = (greedy ``generate`` of n + 1 new tokens - of 1 new token) / n, so the prompt's prefill
cancels; the variants are interleaved and the fastest of ``repeats`` runs is kept. ``modules_ms_per_token`` is the
same with the block decode step switched off (:data:`moduleformer_exit.decode_step.ENABLED`), timed in the same
interleaved runs; ``ops_per_token`` / ``modules_ops_per_token`` count the tensor ops one cached decode step
dispatches (a deterministic measure of the per-op overhead that keeps decode from the limit on a CPU).
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Optional, Sequence

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from .. import decode_step
from ..configuration import ModuleFormerConfig
from ..hf_compat import output_cache
from .decode import decode_model
from .timing import fastest_ms, process_settings

__all__ = ["active_weight_shapes", "gemv_chain_ms", "ops_per_step", "bench_decode_limit", "DECODE_LIMIT_COLUMNS"]

DECODE_LIMIT_COLUMNS = [("batch", "d"), ("tokens_per_s", ".1f"), ("ms_per_token", ".2f"), ("gemv_limit_ms", ".2f"),
                        ("of_limit", ".2f"), ("modules_ms_per_token", ".2f"), ("ops_per_token", "d"),
                        ("modules_ops_per_token", "d")]


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


@contextlib.contextmanager
def _decode_step(enabled: bool) -> Iterator[None]:
    previous = decode_step.ENABLED
    decode_step.ENABLED = enabled
    try:
        yield
    finally:
        decode_step.ENABLED = previous


class _OpCounter(TorchDispatchMode):
    """Counts the aten ops dispatched while active."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def ops_per_step(model, prompt: torch.Tensor) -> int:
    """Tensor ops dispatched by one cached decode step (one new token per row) after prefilling ``prompt``."""
    with torch.inference_mode():
        out = model(prompt, use_cache=True)
        cache = output_cache(out)
        with _OpCounter() as counter:
            model(prompt[:, -1:], cache=cache, use_cache=True)
    return counter.count


def bench_decode_limit(config: Optional[ModuleFormerConfig] = None, batch_sizes: Sequence[int] = (1, 16),
                       prompt_len: int = 32, new_tokens: int = 32, threads: int = 2, repeats: int = 3) -> list[dict]:
    """One row per batch size: ``batch, tokens_per_s, ms_per_token, gemv_limit_ms, of_limit`` (limit / decode),
    ``modules_ms_per_token`` (the block decode step off), ``ops_per_token, modules_ops_per_token``.

    Uses ``configs/moduleformer-25m-active.json`` unless ``config`` is given; greedy ``generate`` with the KV cache.
    """
    with process_settings(threads=threads):
        model = decode_model(config)
        config = model.config
        rows = []
        for batch in batch_sizes:
            prompt = torch.randint(3, config.vocab_size, (batch, prompt_len))

            def generate(n: int, step: bool) -> Callable[[], object]:
                kwargs = dict(max_new_tokens=n, min_new_tokens=n, do_sample=False,
                              pad_token_id=config.pad_token_id or 0)

                def run():
                    with torch.inference_mode(), _decode_step(step):
                        model.generate(prompt, **kwargs)
                return run

            fastest = fastest_ms({f"{name}_{step}": generate(n, step) for name, n in (("one", 1),
                                                                                     ("many", new_tokens + 1))
                                  for step in (True, False)}, repeats)
            best = {name: ms / 1e3 for name, ms in fastest.items()}  # seconds
            per_token = (best["many_True"] - best["one_True"]) / new_tokens
            modules_per_token = (best["many_False"] - best["one_False"]) / new_tokens
            limit = gemv_chain_ms(config, batch, repeats=max(3, repeats))
            ops = ops_per_step(model, prompt)
            with _decode_step(False):
                modules_ops = ops_per_step(model, prompt)
            rows.append(dict(batch=batch, tokens_per_s=batch / per_token, ms_per_token=per_token * 1e3,
                             gemv_limit_ms=limit, of_limit=limit / (per_token * 1e3),
                             modules_ms_per_token=modules_per_token * 1e3, ops_per_token=ops,
                             modules_ops_per_token=modules_ops))
        return rows
