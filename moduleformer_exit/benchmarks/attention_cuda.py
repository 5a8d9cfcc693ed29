"""GPU benchmark: Triton stick-breaking attention vs causal softmax attention (SDPA, flash-attn if installed).

Imports without a GPU or triton (everything GPU-specific is imported inside the function). Run on CUDA only.
"""
from __future__ import annotations

import statistics
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F

from .attention import peak_memory_mb
from .timing import time_calls

__all__ = ["bench_stick_breaking_cuda"]


def _bench_ms(fn: Callable[[], object], warmup: int, rep: int) -> float:
    """Median milliseconds of ``fn`` (triton.testing.do_bench when available: L2 flush, CUDA events)."""
    try:
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))
    except ImportError:  # pragma: no cover - triton missing on a CUDA box
        return statistics.median(time_calls({"fn": fn}, repeats=20, warmup=3, cuda=True)["fn"])


def bench_stick_breaking_cuda(seq_lens: Sequence[int] = (1024, 2048, 4096, 8192, 16384), *,
                              tokens: int = 16384, batch_size: Optional[int] = None, kv_heads: int = 8,
                              query_sets: int = 2, head_dim: int = 64, dtype: torch.dtype = torch.bfloat16,
                              block_m: Optional[int] = None, block_n: Optional[int] = None,
                              check: bool = True, warmup: int = 25, rep: int = 100) -> List[Dict[str, float]]:
    """Time Triton stick-breaking attention forward and forward+backward against causal softmax attention.

    Shapes (equal for every method): q [B, T, query_sets, kv_heads, head_dim] for stick-breaking (query_sets
    selected attention experts sharing each K/V head, as in ModuleFormer), i.e. Hq = query_sets * kv_heads query
    heads over kv_heads K/V heads: SDPA gets q [B, Hq, T, D], k/v [B, kv_heads, T, D] with ``enable_gqa=True``
    (``is_causal=True``), flash-attn (if importable) its native GQA layout with ``causal=True``.

    Args:
        seq_lens: sequence lengths T (S = T, no cache).
        tokens: B * T per measurement when ``batch_size`` is None (B = max(1, tokens // T)).
        check: first compare the Triton kernel (forward and grads) with the torch path at the smallest T
            (bf16 tolerance); the max abs errors are put in every row.
        warmup, rep: ``triton.testing.do_bench`` budgets in ms.

    Returns:
        one dict per T: T, B, Hq, D, ``sb_fwd_ms``, ``sb_fwdbwd_ms``, ``sdpa_fwd_ms``, ``sdpa_fwdbwd_ms``
        (``flash_fwd_ms``, ``flash_fwdbwd_ms`` when flash-attn is installed), ``ratio_fwd`` / ``ratio_fwdbwd``
        (stick-breaking time / SDPA time), ``sb_fwd_tflops`` (4 * D * causal pairs / time), ``sb_fwd_peak_mb``,
        ``sb_fwdbwd_peak_mb``, ``sdpa_fwdbwd_peak_mb``, and ``check_max_err_*`` when ``check``.
    """
    if not torch.cuda.is_available():
        raise RuntimeError("bench_stick_breaking_cuda needs a CUDA GPU")
    from ..kernels.stick_breaking import stick_breaking_attention
    from ..kernels.triton_stick_breaking import HAS_TRITON, triton_stick_breaking_attention

    if not HAS_TRITON:
        raise RuntimeError("bench_stick_breaking_cuda needs triton")
    try:
        from flash_attn import flash_attn_func  # optional anchor
    except Exception:
        flash_attn_func = None

    dev = torch.device("cuda")
    K, H, D = query_sets, kv_heads, head_dim
    Hq = K * H

    def sb(q, k, v):
        return triton_stick_breaking_attention(q, k, v, block_m=block_m, block_n=block_n)

    errors: Dict[str, float] = {}
    if check:
        T0 = min(seq_lens)
        g = torch.Generator(device=dev).manual_seed(0)
        q, k, v = (torch.randn(*s, generator=g, device=dev, dtype=dtype).requires_grad_()
                   for s in ((1, T0, K, H, D), (1, T0, H, D), (1, T0, H, D)))
        out = sb(q, k, v)
        grad = torch.randn_like(out)
        got = (out,) + torch.autograd.grad(out, (q, k, v), grad)
        q32, k32, v32 = (x.detach().float().requires_grad_() for x in (q, k, v))
        ref = stick_breaking_attention(q32, k32, v32, backend="torch")
        want = (ref,) + torch.autograd.grad(ref, (q32, k32, v32), grad.float())
        for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
            errors[f"check_max_err_{name}"] = (a.float() - b).abs().max().item()
            errors[f"check_ref_absmax_{name}"] = b.abs().max().item()

    rows = []
    for T in seq_lens:
        B = batch_size if batch_size is not None else max(1, tokens // T)
        q = torch.randn(B, T, K, H, D, device=dev, dtype=dtype, requires_grad=True)
        k = torch.randn(B, T, H, D, device=dev, dtype=dtype, requires_grad=True)
        v = torch.randn(B, T, H, D, device=dev, dtype=dtype, requires_grad=True)
        do = torch.randn_like(q)
        # SDPA layout [B, heads, T, D]; query head index = set * H + head (GQA groups are contiguous in torch,
        # so each K/V head here serves a different subset than in ModuleFormer - same work, same shapes)
        qs = q.detach().permute(0, 2, 3, 1, 4).reshape(B, Hq, T, D).contiguous().requires_grad_()
        ks = k.detach().transpose(1, 2).contiguous().requires_grad_()
        vs = v.detach().transpose(1, 2).contiguous().requires_grad_()
        dos = torch.randn_like(qs)

        def sdpa():
            return F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, enable_gqa=True)

        def fwdbwd(f, inputs, grad):
            def run():
                out = f()
                torch.autograd.grad(out, inputs, grad)
            return run

        row: Dict[str, float] = {"T": T, "B": B, "Hq": Hq, "H_kv": H, "D": D}
        with torch.no_grad():
            row["sb_fwd_ms"] = _bench_ms(lambda: sb(q, k, v), warmup, rep)
            row["sdpa_fwd_ms"] = _bench_ms(sdpa, warmup, rep)
            row["sb_fwd_peak_mb"] = peak_memory_mb(lambda: sb(q, k, v))
        row["sb_fwdbwd_ms"] = _bench_ms(fwdbwd(lambda: sb(q, k, v), (q, k, v), do), warmup, rep)
        row["sdpa_fwdbwd_ms"] = _bench_ms(fwdbwd(sdpa, (qs, ks, vs), dos), warmup, rep)
        row["sb_fwdbwd_peak_mb"] = peak_memory_mb(fwdbwd(lambda: sb(q, k, v), (q, k, v), do))
        row["sdpa_fwdbwd_peak_mb"] = peak_memory_mb(fwdbwd(sdpa, (qs, ks, vs), dos))
        if flash_attn_func is not None:
            qf = q.detach().reshape(B, T, Hq, D).requires_grad_()  # flash layout [B, T, heads, D]
            kf, vf = k.detach().requires_grad_(), v.detach().requires_grad_()

            def flash():
                return flash_attn_func(qf, kf, vf, causal=True)

            with torch.no_grad():
                row["flash_fwd_ms"] = _bench_ms(flash, warmup, rep)
            row["flash_fwdbwd_ms"] = _bench_ms(fwdbwd(flash, (qf, kf, vf), torch.randn_like(qf)), warmup, rep)
        row["ratio_fwd"] = row["sb_fwd_ms"] / row["sdpa_fwd_ms"]
        row["ratio_fwdbwd"] = row["sb_fwdbwd_ms"] / row["sdpa_fwdbwd_ms"]
        pairs = B * Hq * T * (T + 1) / 2  # causal (query, key) pairs
        row["sb_fwd_tflops"] = 4 * D * pairs / (row["sb_fwd_ms"] * 1e-3) / 1e12
        row.update(errors)
        rows.append(row)
        del q, k, v, qs, ks, vs, do, dos
        torch.cuda.empty_cache()
    return rows


if __name__ == "__main__":  # pragma: no cover
    import json

    print(json.dumps(bench_stick_breaking_cuda(), indent=1))
