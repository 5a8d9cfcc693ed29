"""Training throughput through DeepSpeed vs a plain PyTorch loop, and peak memory per ZeRO stage.

``bench_training()`` runs every measurement in a fresh subprocess (peak RSS is per process and cannot be reset;
DeepSpeed needs its own process group): the plain loop (torch AdamW + clip_grad_norm_), then DeepSpeed with ZeRO
stages 0/1/2/3 (client torch AdamW, same clipping), on the same model, batch and seed. Rows: ``mode``, ``stage``,
``tokens_per_s``, ``overhead_pct`` (DeepSpeed step time over the plain loop's, in %), ``peak_rss_mb`` (process peak)
and ``peak_delta_mb`` (peak minus the RSS before the model was built), ``final_loss``. On a GPU the peak is
``torch.cuda.max_memory_allocated``. With ``nproc > 1`` the DeepSpeed runs use ``torchrun`` (ZeRO sharding only
saves memory across ranks; the row reports rank 0).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Optional, Sequence

from .process_memory import peak_rss_mb, rss_mb

DEFAULT_MODEL = dict(vocab_size=2048, n_embd=128, n_layer=4, n_head=4, att_hidden=64, ffd_hidden=128,
                     n_att_experts=8, k_att=2, n_mlp_experts=8, k_mlp=2, gating_size=32, block_size=128,
                     history_length=128, aux_loss_weight=0.01, bos_token_id=1, eos_token_id=2, pad_token_id=0)



def _child(spec: dict) -> dict:
    """One measurement (runs inside the subprocess)."""
    import torch

    torch.set_num_threads(spec["threads"])
    torch.set_flush_denormal(True)
    from moduleformer_exit import ModuleFormerConfig, MultiExitConfiguration, MultiExitModuleFormer

    stage = spec["stage"]
    dist = None
    if stage is not None:
        from moduleformer_exit.training.distributed import init_deepspeed_distributed

        deepspeed = init_deepspeed_distributed()
        import deepspeed.comm as dist
    base_rss = rss_mb()
    torch.manual_seed(0)
    layers = tuple(spec["exits"]) or None
    config = ModuleFormerConfig(**spec["model"])
    config.lm_loss_weight = 1.0  # pretraining's joint loss (original head + exits + aux), owned by the model
    wrapped = MultiExitModuleFormer(config, multi_exit_config=MultiExitConfiguration(lm_head_layer_indices=layers))
    opt = torch.optim.AdamW(wrapped.parameters(), lr=1e-3)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, spec["model"]["vocab_size"], (spec["batch_size"], spec["seq_len"]), generator=g)
    if stage is None:
        wrapped.to(device)
        x = x.to(device)

        def step():
            loss = wrapped(input_ids=x, labels=x).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(wrapped.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss
    else:
        ds_config = {"train_micro_batch_size_per_gpu": spec["batch_size"], "gradient_accumulation_steps": 1,
                     "train_batch_size": spec["batch_size"] * dist.get_world_size(), "gradient_clipping": 1.0,
                     "zero_optimization": {"stage": stage}, "steps_per_print": 10 ** 9}
        engine, _, _, _ = deepspeed.initialize(model=wrapped, optimizer=opt, config=ds_config)
        x = x.to(engine.device)

        def step():
            loss = engine(input_ids=x, labels=x).loss
            engine.backward(loss)
            engine.step()
            return loss
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for _ in range(spec["warmup"]):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(spec["steps"]):
        loss = step()
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    world = dist.get_world_size() if dist is not None else 1
    row = {"mode": "torch" if stage is None else "deepspeed", "stage": stage, "world_size": world,
           "tokens_per_s": spec["batch_size"] * spec["seq_len"] * spec["steps"] * world / seconds,
           "step_ms": 1000 * seconds / spec["steps"], "final_loss": float(loss)}
    if device == "cuda":
        row["peak_mb"] = torch.cuda.max_memory_allocated() / 2 ** 20
    else:
        row["peak_rss_mb"] = peak_rss_mb()
        row["peak_delta_mb"] = peak_rss_mb() - base_rss
    return row


def _run_child(spec: dict, nproc: int, timeout: float) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "row.json")
        env = dict(os.environ, OMP_NUM_THREADS=str(spec["threads"]), DS_ACCELERATOR=os.environ.get(
            "DS_ACCELERATOR", "cpu"), TOKENIZERS_PARALLELISM="false", MFX_BENCH_SPEC=json.dumps(spec),
            MFX_BENCH_OUT=out)
        for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
            env.pop(k, None)
        if spec["stage"] is not None and nproc > 1:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
                   "-m", __name__]
        else:
            cmd = [sys.executable, "-m", __name__]
        proc = subprocess.run(cmd, env=env, cwd=tmp, capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0 or not os.path.isfile(out):
            raise RuntimeError(f"benchmark child {spec['stage']} failed:\n{proc.stderr[-3000:]}")
        with open(out) as f:
            return json.load(f)


def bench_training(model: Optional[dict] = None, exits: Sequence[int] = (1, 2, 3), batch_size: int = 16,
                   seq_len: int = 128, steps: int = 10, warmup: int = 3, stages: Sequence[int] = (0, 1, 2, 3),
                   threads: int = 2, nproc: int = 1, timeout: float = 600) -> list[dict]:
    """Rows for the plain PyTorch loop and DeepSpeed ZeRO ``stages`` (see the module docstring)."""
    spec = {"model": {**DEFAULT_MODEL, **(model or {})}, "exits": list(exits), "batch_size": batch_size,
            "seq_len": seq_len, "steps": steps, "warmup": warmup, "threads": threads}
    rows = [_run_child({**spec, "stage": None}, 1, timeout)]
    for stage in stages:
        rows.append(_run_child({**spec, "stage": stage}, nproc, timeout))
    base_ms = rows[0]["step_ms"]
    for row in rows:
        row["overhead_pct"] = 100.0 * (row["step_ms"] / base_ms - 1.0)
    return rows


if __name__ == "__main__":
    _spec = json.loads(os.environ["MFX_BENCH_SPEC"])
    _row = _child(_spec)
    if int(os.environ.get("RANK", "0")) == 0:
        with open(os.environ["MFX_BENCH_OUT"], "w") as _f:
            json.dump(_row, _f)
