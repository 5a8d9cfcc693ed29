"""GPU benchmark row: ModuleFormer training step (forward + backward + AdamW) tokens/s and model FLOPs utilisation.

Only runs on a CUDA device (``moduleformer-exit bench --device cuda``); importing it needs no GPU.
"""
from __future__ import annotations

import time
from typing import Optional

import torch

from ..configuration import ModuleFormerConfig, bundled_config_path
from ..modeling import ModuleFormerForCausalLM
from .decode import active_parameters


def training_flops_per_token(config: ModuleFormerConfig, seq_len: int) -> float:
    """Active training FLOPs per token: 6 x active parameters (incl. ``lm_head``) plus the attention score and
    value matmuls (causal: ~seq_len/2 keys per query, k_att * n_head query heads per token, x3 for backward)."""
    attention = 2 * 2 * config.k_att * config.att_hidden * (seq_len / 2)
    return 6.0 * active_parameters(config) + 3.0 * attention * config.n_layer


def bench_training_step_cuda(
    config: Optional[ModuleFormerConfig] = None,
    batch: int = 8,
    seq_len: int = 2048,
    backend: str = "auto",
    steps: int = 10,
    warmup: int = 3,
    peak_tflops: float = 989.0,
    device: str = "cuda",
) -> list[dict]:
    """Time full training steps (bf16 weights, fused AdamW) of the ~350M-active config on one GPU.

    Returns one dict with ``backend, batch, seq_len, step_ms, tokens_per_s, tflops, mfu`` (achieved / ``peak_tflops``,
    default H100 SXM dense bf16) and ``host_syncs`` (synchronising CUDA calls in one step, counted with
    ``torch.cuda.set_sync_debug_mode``; the MoE path is designed to need none).
    """
    if not torch.cuda.is_available():
        raise RuntimeError("bench_training_step_cuda needs a CUDA device")
    config = config or ModuleFormerConfig.from_json_file(bundled_config_path("moduleformer-350m-active"))
    config.kernel_backend = backend
    torch.manual_seed(0)
    model = ModuleFormerForCausalLM(config).to(device=device, dtype=torch.bfloat16).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    data = torch.randint(0, config.vocab_size, (batch, seq_len), device=device)

    def step() -> None:
        loss = model(data, labels=data, use_cache=False).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    step_s = (time.perf_counter() - start) / steps
    syncs = _count_host_syncs(step)
    tokens_per_s = batch * seq_len / step_s
    tflops = tokens_per_s * training_flops_per_token(config, seq_len) / 1e12
    return [dict(backend=backend, batch=batch, seq_len=seq_len, step_ms=step_s * 1e3, tokens_per_s=tokens_per_s,
                 tflops=tflops, mfu=tflops / peak_tflops, host_syncs=syncs)]


def _count_host_syncs(fn) -> int:
    """Number of synchronising CUDA calls made by ``fn`` (warnings from ``set_sync_debug_mode("warn")``)."""
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message).lower() for w in caught)
