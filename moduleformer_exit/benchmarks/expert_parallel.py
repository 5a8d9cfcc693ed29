"""Expert parallelism: measured tokens/s and peak memory per rank for EP=1 vs EP=2 on 2 processes of this machine,
and the paper memory model of a MoLM-350M-4B-sized model on 8 and 64 GPUs.

``bench_expert_parallel()`` starts each measurement with ``torchrun --nproc_per_node 2`` (fresh processes: peak RSS
cannot be reset): the same model, batch and seed under DeepSpeed ZeRO-2, once with every expert on every rank
(EP=1) and once with the experts split over the 2 ranks (EP=2, ``training/expert_parallel.py``). Each rank reports
its own peak RSS (``peak_rss_mb``) and the growth over the RSS before the model was built (``peak_delta_mb``).
On a 2-core CPU the all-to-alls cost more than the smaller local GEMMs save: the memory per rank is the point.

``memory_model()`` is arithmetic on :func:`moduleformer_exit.accounting.parameter_counts` of
``configs/moduleformer-350m-active.json`` (24 layers, width 1024, 16 attention and 32 MLP experts: ~4.1B parameters),
for bf16 mixed precision with Adam: 2 bytes per parameter (bf16 weights), 2 per gradient, 12 of optimizer state
(fp32 master copy, momentum, variance). Per rank with N ranks, Ψ parameters of which Ψe are expert weights:

- DP + ZeRO-2: weights 2Ψ (replicated), gradients 2Ψ/N, optimizer 12Ψ/N;
- ZeRO-3: 2Ψ/N, 2Ψ/N, 12Ψ/N, plus the gathered weights of the layer being computed (``layer_gather_gb``: every
  expert of a layer, 2 * Ψ_layer bytes; DeepSpeed prefetches more);
- EP=8 + ZeRO-2: weights 2(Ψ - Ψe) + 2Ψe/8 (a rank holds 1/8 of the experts), gradients 2Ψ/N and optimizer 12Ψ/N
  (expert states are partitioned over the N/8 ranks holding the same experts).

Activations, communication buckets and fragmentation are left out.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Optional

from .process_memory import peak_rss_mb, rss_mb

DEFAULT_MODEL = dict(vocab_size=2048, n_embd=256, n_layer=4, n_head=4, att_hidden=128, ffd_hidden=512,
                     n_att_experts=16, k_att=2, n_mlp_experts=32, k_mlp=2, gating_size=64, block_size=128,
                     history_length=128, aux_loss_weight=0.01, bos_token_id=1, eos_token_id=2, pad_token_id=0)
QUICK_MODEL = dict(DEFAULT_MODEL, n_embd=32, n_layer=2, n_head=2, att_hidden=16, ffd_hidden=32, n_att_experts=4,
                   n_mlp_experts=4, gating_size=8, vocab_size=128)

MEASURED_COLUMNS = [("ep_size", "d"), ("rank", "d"), ("local_params", ",d"), ("step_ms", ".0f"),
                    ("tokens_per_s", ",.0f"), ("peak_rss_mb", ".0f"), ("peak_delta_mb", ".0f")]
MODEL_COLUMNS = [("strategy", ""), ("gpus", "d"), ("weights_gb", ".2f"), ("grads_gb", ".2f"), ("optimizer_gb", ".2f"),
                 ("total_gb", ".2f"), ("layer_gather_gb", ".2f")]



def _child(spec: dict) -> dict:
    """One rank of one measurement (inside torchrun)."""
    import torch

    torch.set_num_threads(spec["threads"])
    torch.set_flush_denormal(True)
    from moduleformer_exit import ModuleFormerConfig, MultiExitModuleFormer
    from moduleformer_exit.training.distributed import init_deepspeed_distributed
    from moduleformer_exit.training.expert_parallel import enable_expert_parallel, moe_param_groups

    deepspeed = init_deepspeed_distributed()
    import deepspeed.comm as dist

    base_rss = rss_mb()
    torch.manual_seed(0)
    config = ModuleFormerConfig(**spec["model"])
    config.lm_loss_weight = 1.0
    model = MultiExitModuleFormer(config)
    if spec["ep_size"] > 1:
        enable_expert_parallel(model, spec["ep_size"])  # before the optimizer: it must see the local shards
    groups = [{"params": list(model.parameters()), "name": "all"}]
    if spec["ep_size"] > 1:
        groups = moe_param_groups(groups)
    opt = torch.optim.AdamW(groups, lr=1e-3)
    world = dist.get_world_size()
    ds_config = {"train_micro_batch_size_per_gpu": spec["batch_size"], "gradient_accumulation_steps": 1,
                 "train_batch_size": spec["batch_size"] * world, "gradient_clipping": 1.0,
                 "zero_optimization": {"stage": spec["stage"]}, "steps_per_print": 10 ** 9}
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=ds_config)
    g = torch.Generator().manual_seed(1 + dist.get_rank())
    x = torch.randint(0, spec["model"]["vocab_size"], (spec["batch_size"], spec["seq_len"]), generator=g)

    def step():
        loss = engine(input_ids=x, labels=x).loss
        engine.backward(loss)
        engine.step()

    for _ in range(spec["warmup"]):
        step()
    dist.barrier()
    t0 = time.perf_counter()
    for _ in range(spec["steps"]):
        step()
    dist.barrier()
    seconds = time.perf_counter() - t0
    row = {"ep_size": spec["ep_size"], "rank": dist.get_rank(), "local_params": sum(p.numel() for p in
                                                                                     model.parameters()),
           "step_ms": 1000 * seconds / spec["steps"],
           "tokens_per_s": spec["batch_size"] * spec["seq_len"] * spec["steps"] * world / seconds,
           "peak_rss_mb": peak_rss_mb(), "peak_delta_mb": peak_rss_mb() - base_rss}
    rows = [None] * world
    dist.all_gather_object(rows, row)
    return rows


def _run(spec: dict, timeout: float) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "rows.json")
        env = dict(os.environ, OMP_NUM_THREADS=str(spec["threads"]), DS_ACCELERATOR=os.environ.get(
            "DS_ACCELERATOR", "cpu"), TOKENIZERS_PARALLELISM="false", MFX_EP_SPEC=json.dumps(spec), MFX_EP_OUT=out)
        for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
            env.pop(k, None)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
               str(spec["nproc"]), "-m", __name__]
        proc = subprocess.run(cmd, env=env, cwd=tmp, capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0 or not os.path.isfile(out):
            raise RuntimeError(f"expert-parallel benchmark (ep_size={spec['ep_size']}) failed:\n"
                               f"{proc.stderr[-3000:]}")
        with open(out) as f:
            return json.load(f)


def bench_expert_parallel(model: Optional[dict] = None, batch_size: int = 8, seq_len: int = 128, steps: int = 5,
                          warmup: int = 2, threads: int = 1, stage: int = 2, timeout: float = 900) -> list[dict]:
    """Rows per (ep_size, rank) for EP=1 and EP=2 on 2 processes (see the module docstring)."""
    spec = {"model": {**DEFAULT_MODEL, **(model or {})}, "batch_size": batch_size, "seq_len": seq_len,
            "steps": steps, "warmup": warmup, "threads": threads, "stage": stage, "nproc": 2}
    return [row for ep in (1, 2) for row in _run({**spec, "ep_size": ep}, timeout)]


def memory_model(config=None, gpu_counts: tuple = (8, 64), ep: int = 8) -> list[dict]:
    """Per-rank GB of weights, gradients and optimizer states (bf16 + Adam) for DP+ZeRO-2, ZeRO-3 and
    EP=``ep`` + ZeRO-2 on each GPU count; ``config`` defaults to ``configs/moduleformer-350m-active.json``."""
    from ..accounting import parameter_counts
    from ..configuration import ModuleFormerConfig, bundled_config_path

    config = config or ModuleFormerConfig.from_json_file(bundled_config_path("moduleformer-350m-active"))
    counts = parameter_counts(config)
    total, experts = counts["total"], counts["attention_experts"] + counts["mlp_experts"]
    layer = (total - counts["embedding"]) / config.n_layer
    gb = 1e9
    rows = []
    for n in gpu_counts:
        for name, weights, gather in (("DP + ZeRO-2", 2 * total, 0.0), ("ZeRO-3", 2 * total / n, 2 * layer),
                                      (f"EP={ep} + ZeRO-2", 2 * (total - experts) + 2 * experts / ep, 0.0)):
            grads, optim = 2 * total / n, 12 * total / n
            rows.append({"strategy": name, "gpus": n, "weights_gb": weights / gb, "grads_gb": grads / gb,
                         "optimizer_gb": optim / gb, "total_gb": (weights + grads + optim) / gb,
                         "layer_gather_gb": gather / gb, "params": total, "expert_params": experts})
    return rows


def render_expert_parallel(rows: list[dict], table) -> None:
    """Print the measured table and the memory model (rows of :func:`run_section`)."""
    measured = [r for r in rows if "rank" in r]
    paper = [r for r in rows if "strategy" in r]
    table("Expert parallelism, measured: EP=1 vs EP=2 on 2 processes, DeepSpeed ZeRO-2, fp32 (tokens/s over both "
          "ranks; peak RSS per rank)", MEASURED_COLUMNS, measured)
    if paper:
        p = paper[0]
        table(f"Memory model per GPU, MoLM-350M-4B shape ({p['params'] / 1e9:.2f}B parameters, "
              f"{p['expert_params'] / 1e9:.2f}B in experts), bf16 weights/grads + fp32 Adam; activations excluded",
              MODEL_COLUMNS, paper)


def run_section(quick: bool, threads: int) -> list[dict]:
    """The ``bench --only expert-parallel`` rows: measured (tiny model and 1 step when ``quick``) + memory model."""
    if quick:
        measured = bench_expert_parallel(model=QUICK_MODEL, batch_size=2, seq_len=16, steps=1, warmup=1)
    else:
        measured = bench_expert_parallel(threads=max(1, threads // 2))
    return measured + memory_model()


if __name__ == "__main__":
    _rows = _child(json.loads(os.environ["MFX_EP_SPEC"]))
    if int(os.environ.get("RANK", "0")) == 0:
        with open(os.environ["MFX_EP_OUT"], "w") as _f:
            json.dump(_rows, _f)
