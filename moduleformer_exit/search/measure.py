"""On-device measurements of one ModuleFormer config: decode / prefill latency, per-exit decode latency and peak
memory, on the device the search runs on (CPU or CUDA).

Latency: batch 1, a random prompt of ``prompt_len`` tokens, plain forwards with a transformers ``DynamicCache``
(prefill, then ``new_tokens`` one-token decode steps), ``warmup`` untimed rounds, then the median over ``repeats``
rounds. Per-exit decode latency (``exits=True``): forward hooks time each block inside the decode steps; exit L's
latency is the time from the step's start to the end of block L plus one final-norm + LM-head call.

Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` minus the allocation before the model was built; on CPU the
growth of the process's peak resident set (``VmHWM``, reset through ``/proc/self/clear_refs``) over the resident
set before the model was built (freed heap returned first with ``malloc_trim``), so it covers the weights, the
KV cache and the largest transient activations of prefill + decode.
"""
from __future__ import annotations

import ctypes
import gc
import statistics
import time
from dataclasses import dataclass
from typing import Optional

import torch

from ..configuration import ModuleFormerConfig


@dataclass(frozen=True)
class MeasureSettings:
    """How a candidate is measured (part of the cache key: changing any field re-measures)."""

    device: str = "cpu"
    prompt_len: int = 16
    new_tokens: int = 8
    warmup: int = 1
    repeats: int = 3
    threads: Optional[int] = None
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("prompt_len", "new_tokens", "repeats"):
            if getattr(self, name) < 1:
                raise ValueError(f"MeasureSettings.{name} must be >= 1, got {getattr(self, name)}")
        if self.warmup < 0:
            raise ValueError(f"MeasureSettings.warmup must be >= 0, got {self.warmup}")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"device {self.device!r} was asked for but torch sees no CUDA GPU: use --device cpu")


def _status_bytes(field: str) -> int:
    with open("/proc/self/status", encoding="ascii") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


class _PeakMemory:
    """Peak memory growth over a ``with`` block (see the module docstring for the CPU / CUDA definitions)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak_bytes = 0

    def __enter__(self) -> "_PeakMemory":
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        else:
            try:
                ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed heap back so the baseline is the live set
            except OSError:
                pass
            with open("/proc/self/clear_refs", "w", encoding="ascii") as handle:
                handle.write("5")  # resets VmHWM to the current resident set
            self.base = _status_bytes("VmRSS")
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device) - self.base
        else:
            self.peak_bytes = max(0, _status_bytes("VmHWM") - self.base)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _BlockTimer:
    """Forward hooks that record when each block of the decoder finishes (``ends[i]``, perf_counter seconds)."""

    def __init__(self, blocks: torch.nn.ModuleList, device: torch.device) -> None:
        self.ends: list[float] = [0.0] * len(blocks)
        self.device = device
        self.handles = [block.register_forward_hook(self._hook(i)) for i, block in enumerate(blocks)]

    def _hook(self, index: int):
        def record(module, args, output):
            _sync(self.device)
            self.ends[index] = time.perf_counter()
        return record

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


@torch.inference_mode()
def _one_round(model, prompt: torch.Tensor, new_tokens: int, timer: Optional[_BlockTimer],
               device: torch.device) -> tuple[float, float, list[list[float]]]:
    """Prefill + greedy decode; returns (prefill s, decode s per token, per-step per-block elapsed s)."""
    from transformers.cache_utils import DynamicCache

    cache = DynamicCache(config=model.config)
    _sync(device)
    start = time.perf_counter()
    logits = model(input_ids=prompt, use_cache=True, logits_to_keep=1, cache=cache).logits
    _sync(device)
    prefill = time.perf_counter() - start
    token = logits[:, -1:].argmax(-1)
    steps = []
    decode_start = time.perf_counter()
    for _ in range(new_tokens):
        step_start = time.perf_counter()
        logits = model(input_ids=token, use_cache=True, cache=cache).logits
        token = logits[:, -1:].argmax(-1)
        if timer is not None:
            steps.append([end - step_start for end in timer.ends])
    _sync(device)
    return prefill, (time.perf_counter() - decode_start) / new_tokens, steps


@torch.inference_mode()
def _head_seconds(model, device: torch.device, repeats: int) -> float:
    """Median time of one exit head call (final norm + LM head on one token's hidden state)."""
    hidden = torch.zeros(1, 1, model.config.n_embd, device=device)
    times = []
    for _ in range(repeats + 1):
        _sync(device)
        start = time.perf_counter()
        model.lm_head(model.transformer.ln_f(hidden))
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def measure_config(config: ModuleFormerConfig, settings: MeasureSettings, exits: bool = False) -> dict:
    """Build a randomly initialised ``ModuleFormerForCausalLM(config)`` on ``settings.device`` and measure it.

    Returns a dict: ``decode_ms`` (median ms per decoded token), ``prefill_ms`` (median ms for the prompt),
    ``peak_memory_mb`` (MiB, see the module docstring), ``param_bytes`` (bytes of the weights as built, fp32), and
    with ``exits`` ``exit_decode_ms``: ``n_layer`` medians, entry L-1 = decode ms per token through exit L.
    """
    from ..modeling import ModuleFormerForCausalLM

    device = torch.device(settings.device)
    if settings.threads is not None:
        torch.set_num_threads(settings.threads)
    torch.manual_seed(settings.seed)
    prompt = torch.randint(0, config.vocab_size, (1, settings.prompt_len), device=device)
    with _PeakMemory(device) as memory:
        model = ModuleFormerForCausalLM(config).to(device).eval()
        timer = _BlockTimer(model.transformer.h, device) if exits else None
        rounds = [_one_round(model, prompt, settings.new_tokens, timer, device)
                  for _ in range(settings.warmup + settings.repeats)][settings.warmup:]
    if timer is not None:
        timer.remove()
    result = {
        "prefill_ms": 1e3 * statistics.median(r[0] for r in rounds),
        "decode_ms": 1e3 * statistics.median(r[1] for r in rounds),
        "peak_memory_mb": memory.peak_bytes / 2**20,
        "param_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
    }
    if exits:
        head = _head_seconds(model, device, settings.repeats)
        steps = [step for r in rounds for step in r[2]]
        result["exit_decode_ms"] = [1e3 * (statistics.median(s[i] for s in steps) + head)
                                    for i in range(config.n_layer)]
    del model, rounds
    gc.collect()
    return result
