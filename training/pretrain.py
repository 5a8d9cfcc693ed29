"""DeepSpeed pretraining of a ModuleFormer (optionally with exit heads trained jointly) from a recipe.

Launch::

    torchrun --standalone --nproc_per_node N -m moduleformer_exit.training.pretrain RECIPE [--output-dir D]
    deepspeed [--hostfile H] --module moduleformer_exit.training.pretrain RECIPE   # multi-node via a hostfile
    moduleformer-exit pretrain RECIPE          # single process without a launcher (RANK/WORLD_SIZE/... defaulted)

Loss = CE(original head) + exits.loss_weight * sum_k CE(exit k) + aux_loss_weight * router aux loss.

Output directory: ``log.jsonl`` (one JSON object per logged step / eval), ``tensorboard/`` (if installed),
``tokenizer/``, ``checkpoints/<tag>/`` (DeepSpeed files + ``rng_rank<r>.pt``) with ``checkpoints/latest`` naming the
last COMPLETE checkpoint, ``final/`` (``save_pretrained`` safetensors + tokenizer).

Checkpoint safety: DeepSpeed's own ``latest`` file is written by rank 0 with a plain ``open(.., "w")`` right after
its own files, without waiting for the other ranks and without fsync, and a re-used tag is overwritten in place, so
a crash can leave ``latest`` empty or pointing at a half-written tag. Here DeepSpeed is called with
``save_latest=False`` on a fresh tag directory; after all ranks have written (barrier) and the files are fsynced,
rank 0 replaces ``latest`` atomically (write ``latest.tmp``, fsync, ``os.replace``). Resume reads ``latest`` only,
so an interrupted save never replaces the last good checkpoint. Older tags beyond ``keep_checkpoints`` are deleted
after the pointer moves.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import random
import shutil
import signal
import socket
import sys
import time
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .recipe import RecipeError, load_recipe, model_config_kwargs

FAULT_ENV = "MODULEFORMER_EXIT_FAULT"  # testing hook: "kill_after_step:N" or "kill_in_save:N" (SIGKILL itself)
POINTER = "latest"


# ----------------------------------------------------------------------------------------------- distributed set-up
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def shutdown_distributed() -> None:
    """Barrier, then tear the process group down: a rank that exits while others still write (rank 0 saving the
    tokenizer, say) would otherwise abort in gloo's background threads ("terminate called without an active
    exception")."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def ensure_dist_env() -> None:
    """Default RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT for a single process without a launcher."""
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("DS_ACCELERATOR", "cpu" if not torch.cuda.is_available() else "cuda")


def init_deepspeed_distributed():
    """Import DeepSpeed, skip the shm comm op on CPU (a ~50 s JIT build), init the process group."""
    ensure_dist_env()
    import deepspeed

    if not torch.cuda.is_available():
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    import deepspeed.comm as dist

    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    return deepspeed


# ----------------------------------------------------------------------------------------------- model + loss
def shifted_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                           ignore_index=-100)


class JointLMLoss(nn.Module):
    """Wraps a (multi-exit) ModuleFormer: forward returns the training loss and its parts.

    ``loss = CE(original) + exit_weight * sum_k CE(exit k) + aux_loss_weight * aux``."""

    def __init__(self, model: nn.Module, exit_weight: float = 1.0) -> None:
        super().__init__()
        self.model = model
        self.exit_weight = exit_weight

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        model = self.model
        exits = list(getattr(model.config, "lm_head_layer_indices", []) or [])
        out = model.transformer(input_ids, use_cache=False, output_hidden_states=bool(exits), compute_aux=True)
        ce = shifted_ce(model.lm_head(out.last_hidden_state), labels)
        parts = {"ce": ce.detach()}
        loss = ce
        for k in exits:
            ce_k = shifted_ce(model.exit_logits(out.hidden_states, k), labels)
            parts[f"ce_exit{k}"] = ce_k.detach()
            loss = loss + self.exit_weight * ce_k
        weight = model.config.aux_loss_weight
        if out.aux_loss is not None:
            parts["aux"] = out.aux_loss.detach()
            if weight > 0:
                loss = loss + weight * out.aux_loss
        parts["loss"] = loss
        return parts


def build_model(recipe: dict, vocab_size: int, seed: int, tokenizer=None):
    from moduleformer_exit import ModuleFormerConfig, MultiExitConfiguration, MultiExitModuleFormer

    torch.manual_seed(seed)
    kwargs = model_config_kwargs(recipe, vocab_size)
    if tokenizer is not None:
        kwargs.update(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                      pad_token_id=tokenizer.pad_token_id)
    config = ModuleFormerConfig(**kwargs)
    layers = recipe["exits"]["layers"]
    return MultiExitModuleFormer(config, multi_exit_config=MultiExitConfiguration(
        lm_head_layer_indices=tuple(layers) if layers else None))


def warmup_cosine(warmup: int, total: int, min_ratio: float):
    """LR multiplier: linear warmup to 1 over ``warmup`` steps, cosine to ``min_ratio`` at ``total``."""
    def fn(step: int) -> float:
        if warmup > 0 and step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return fn


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.ndim >= 2 and "wte" not in name else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def deepspeed_config(recipe: dict, world_size: int) -> dict:
    ds = json.loads(json.dumps(recipe["deepspeed"]))
    ds["train_batch_size"] = ds["train_micro_batch_size_per_gpu"] * ds["gradient_accumulation_steps"] * world_size
    ds.setdefault("steps_per_print", 10 ** 9)
    ds.setdefault("wall_clock_breakdown", False)
    t = recipe["training"]
    if t["optimizer"] == "config":
        ds["optimizer"] = {"type": "AdamW", "params": {"lr": t["lr"], "betas": t["betas"], "eps": t["eps"],
                                                       "weight_decay": t["weight_decay"], "torch_adam": True}}
    return ds


# ----------------------------------------------------------------------------------------------- checkpoints
def _fsync_tree(path: str) -> None:
    for root, _, names in os.walk(path):
        for n in names:
            try:
                fd = os.open(os.path.join(root, n), os.O_RDONLY)
                os.fsync(fd)
                os.close(fd)
            except OSError:
                pass


def write_pointer_atomically(ckpt_dir: str, tag: str) -> None:
    """Replace ``ckpt_dir/latest`` with ``tag`` atomically (tmp file, fsync, rename, fsync dir)."""
    tmp = os.path.join(ckpt_dir, POINTER + ".tmp")
    with open(tmp, "w") as f:
        f.write(tag)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(ckpt_dir, POINTER))
    try:
        fd = os.open(ckpt_dir, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
    except OSError:
        pass


def read_pointer(ckpt_dir: str) -> Optional[str]:
    """The last complete checkpoint's tag, or None."""
    path = os.path.join(ckpt_dir, POINTER)
    if not os.path.isfile(path):
        return None
    tag = open(path).read().strip()
    return tag if tag and os.path.isdir(os.path.join(ckpt_dir, tag)) else None


def _fault(kind: str, step: int) -> None:
    spec = os.environ.get(FAULT_ENV, "")
    if spec and spec == f"{kind}:{step}" and int(os.environ.get("RANK", "0")) == 0:
        os.kill(os.getpid(), signal.SIGKILL)


def rng_state() -> dict:
    """Every RNG the run draws from, as tensors and plain Python values (loadable with ``weights_only=True``)."""
    import numpy as np

    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: dict) -> None:
    """Restore what :func:`rng_state` captured."""
    import numpy as np

    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    npy = state["numpy"]
    np.random.set_state((npy["kind"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"],
                         npy["cached_gaussian"]))
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(engine, ckpt_dir: str, step: int, position: int, keep: int, dist) -> str:
    """Write ``step_<N>`` safely (see the module docstring); returns the tag."""
    rank = dist.get_rank()
    tag = f"step_{step}"
    tag_dir = os.path.join(ckpt_dir, tag)
    if rank == 0:
        os.makedirs(ckpt_dir, exist_ok=True)
        if os.path.isdir(tag_dir):  # leftover of an interrupted save of the same step
            shutil.rmtree(tag_dir)
    dist.barrier()
    engine.save_checkpoint(ckpt_dir, tag=tag, client_state={"step": step, "position": position},
                           save_latest=False)
    torch.save(rng_state(), os.path.join(tag_dir, f"rng_rank{rank}.pt"))
    _fsync_tree(tag_dir)
    _fault("kill_in_save", step)
    dist.barrier()
    if rank == 0:
        write_pointer_atomically(ckpt_dir, tag)
        tags = sorted((d for d in os.listdir(ckpt_dir) if d.startswith("step_") and d != tag
                       and os.path.isdir(os.path.join(ckpt_dir, d))), key=lambda d: int(d.split("_")[1]))
        complete = [d for d in tags if int(d.split("_")[1]) < step]
        for old in complete[:max(0, len(complete) - (keep - 1))]:
            shutil.rmtree(os.path.join(ckpt_dir, old), ignore_errors=True)
        for partial in (d for d in tags if int(d.split("_")[1]) > step):
            shutil.rmtree(os.path.join(ckpt_dir, partial), ignore_errors=True)
    dist.barrier()
    return tag


# ----------------------------------------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate(engine, blocks: torch.Tensor, batch_size: int) -> dict[str, float]:
    """Held-out mean CE and perplexity of the original head and every exit (all ranks run every batch)."""
    was_training = engine.module.training
    engine.eval()
    sums: dict[str, float] = {}
    n = 0
    for i in range(0, blocks.shape[0], batch_size):
        x = blocks[i:i + batch_size].to(engine.device)
        parts = engine(input_ids=x, labels=x)
        for k, v in parts.items():
            if k.startswith("ce"):
                sums[k] = sums.get(k, 0.0) + float(v) * x.shape[0]
        n += x.shape[0]
    if was_training:
        engine.train()
    out = {}
    for k, v in sums.items():
        name = "final" if k == "ce" else k[len("ce_"):]
        out[f"ppl_{name}"] = math.exp(v / n)
    return out


# ----------------------------------------------------------------------------------------------- export
def export_model(engine, out_dir: str, tokenizer, dist) -> None:
    """``save_pretrained`` (safetensors, fp32) + tokenizer; gathers ZeRO-3 partitions first."""
    model = engine.module.model
    if engine.zero_optimization_stage() == 3:
        import deepspeed

        params = list(model.parameters())
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            if dist.get_rank() == 0:
                state = {k: v.detach().float().clone() for k, v in model.state_dict().items()}
    elif dist.get_rank() == 0:
        state = {k: v.detach().float().clone() for k, v in model.state_dict().items()}
    if dist.get_rank() == 0:
        config = copy.deepcopy(model.config)
        config.dtype = torch.float32  # exported in fp32, also after bf16 training
        export = type(model)(config)  # a plain fp32 copy (the engine's module may be bf16 / partitioned)
        export.load_state_dict(state)
        export.save_pretrained(out_dir)
        tokenizer.save_pretrained(out_dir)
    dist.barrier()


# ----------------------------------------------------------------------------------------------- main loop
class JsonlLogger:
    def __init__(self, out_dir: str, enabled: bool) -> None:
        self.enabled = enabled
        self.f = open(os.path.join(out_dir, "log.jsonl"), "a") if enabled else None
        self.tb = None
        if enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(os.path.join(out_dir, "tensorboard"))
            except Exception:  # tensorboard not installed
                self.tb = None

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        self.f.write(json.dumps(record) + "\n")
        self.f.flush()
        if self.tb is not None and "step" in record:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(f"{record.get('kind', 'train')}/{k}", v, record["step"])

    def close(self) -> None:
        if self.f:
            self.f.close()
        if self.tb is not None:
            self.tb.close()


def prepare_data(recipe: dict, out_dir: str, rank: int, dist):
    """Build (or, on resume, reload the tokenizer of) the packed data; rank 0 trains and saves the tokenizer."""
    from datasets.utils.logging import disable_progress_bar

    from .data import build_lm_data

    disable_progress_bar()
    d = recipe["data"]
    tok_dir = os.path.join(out_dir, "tokenizer")
    have_saved = os.path.isfile(os.path.join(tok_dir, "tokenizer.json"))
    common = dict(data_format=d["format"], sample_by=d["sample_by"], text_field=d["text_field"],
                  streaming=d["streaming"], heldout_fraction=d["heldout_fraction"], seed=d["seed"],
                  vocab_size=d["vocab_size"], max_train_blocks=d["max_train_blocks"],
                  max_heldout_blocks=d["max_heldout_blocks"], num_proc=d["num_proc"])
    data = None
    if rank == 0:  # trains the tokenizer (first run) or reuses the run's saved one (resume)
        data = build_lm_data(d["files"], d["block_size"], tokenizer=tok_dir if have_saved else d["tokenizer"],
                             **common)
        if not have_saved:
            data.tokenizer.save_pretrained(tok_dir)
    dist.barrier()
    if rank != 0:
        data = build_lm_data(d["files"], d["block_size"], tokenizer=tok_dir, **common)
    return data


def train(recipe: dict, out_dir: str, resume: bool = True, progress: bool = True) -> dict:
    """Run (or resume) a recipe; returns a summary (final step, held-out perplexities, paths, timings)."""
    deepspeed = init_deepspeed_distributed()
    import deepspeed.comm as dist
    from tqdm.auto import tqdm

    from .data import BlockOrder, batch_positions, unigram_perplexity

    rank, world = dist.get_rank(), dist.get_world_size()
    t = recipe["training"]
    if t["flush_denormal"]:
        # On CPU, denormal floats in the first steps of a fresh model made steps ~60x slower (28 s instead of 0.45 s
        # for the quickstart model): flush them to zero (a no-op where unsupported).
        torch.set_flush_denormal(True)
    os.makedirs(out_dir, exist_ok=True)
    if rank == 0:
        with open(os.path.join(out_dir, "recipe.json"), "w") as f:
            json.dump(recipe, f, indent=2)
    ckpt_dir = os.path.join(out_dir, "checkpoints")
    t0 = time.time()
    data = prepare_data(recipe, out_dir, rank, dist)
    tokenizer = data.tokenizer
    vocab_size = len(tokenizer)
    data_seconds = time.time() - t0

    model = build_model(recipe, vocab_size, t["seed"], tokenizer)
    wrapped = JointLMLoss(model, recipe["exits"]["loss_weight"])
    ds_config = deepspeed_config(recipe, world)
    schedule = warmup_cosine(t["warmup_steps"], t["max_steps"], t["min_lr_ratio"])
    if t["optimizer"] == "client":
        optimizer = torch.optim.AdamW(param_groups(wrapped, t["weight_decay"]), lr=t["lr"], betas=tuple(t["betas"]),
                                      eps=t["eps"])
        engine, optimizer, _, scheduler = deepspeed.initialize(
            model=wrapped, optimizer=optimizer, config=ds_config,
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, schedule))
    else:
        engine, optimizer, _, scheduler = deepspeed.initialize(
            model=wrapped, model_parameters=param_groups(wrapped, t["weight_decay"]), config=ds_config,
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, schedule))

    step, position = 0, 0
    tag = read_pointer(ckpt_dir) if resume else None
    if tag is not None:
        _, client = engine.load_checkpoint(ckpt_dir, tag=tag)
        step, position = client["step"], client["position"]
        rng_path = os.path.join(ckpt_dir, tag, f"rng_rank{rank}.pt")
        if os.path.isfile(rng_path):
            set_rng_state(torch.load(rng_path, weights_only=True))
    else:
        torch.manual_seed(t["seed"] + 1000 * rank)
        random.seed(t["seed"] + rank)

    mbs = ds_config["train_micro_batch_size_per_gpu"]
    gas = ds_config["gradient_accumulation_steps"]
    global_batch = ds_config["train_batch_size"]
    block = data.train.shape[1]
    order = BlockOrder(data.train.shape[0], recipe["data"]["seed"] + t["seed"])
    logger = JsonlLogger(out_dir, rank == 0)
    if tag is None:
        logger.log({"kind": "start", "world_size": world, "n_train_blocks": data.train.shape[0],
                    "n_heldout_blocks": data.heldout.shape[0], "vocab_size": vocab_size,
                    "unigram_ppl": unigram_perplexity(data.train, data.heldout, vocab_size),
                    "n_params": sum(p.numel() for p in model.parameters()) if engine.zero_optimization_stage() < 3
                    else None})
    else:
        logger.log({"kind": "resume", "step": step, "position": position, "tag": tag})
    bar = tqdm(total=t["max_steps"], initial=step, disable=not (progress and rank == 0), dynamic_ncols=True,
               desc=recipe["name"])
    engine.train()
    train_t0, train_tokens = time.time(), 0
    last_eval: dict = {}
    while step < t["max_steps"]:
        step_t0 = time.time()
        totals: dict[str, torch.Tensor] = {}
        for micro in range(gas):
            idx = order.indices(batch_positions(position, micro, rank, world, mbs), mbs)
            x = data.train[idx].to(engine.device)
            parts = engine(input_ids=x, labels=x)
            engine.backward(parts["loss"])
            engine.step()
            for k, v in parts.items():
                totals[k] = totals.get(k, 0.0) + v.detach().float() / gas
        position += global_batch
        step += 1
        names = sorted(totals)
        vec = torch.stack([totals[k] for k in names]).to(engine.device)
        dist.all_reduce(vec)
        vec = (vec / world).cpu()
        metrics = {k: float(vec[i]) for i, k in enumerate(names)}
        dt = time.time() - step_t0
        train_tokens += global_batch * block
        tok_s = global_batch * block / max(dt, 1e-9)
        lr = engine.get_lr()[0]
        bar.update(1)
        bar.set_postfix(loss=f"{metrics['loss']:.3f}", tok_s=f"{tok_s:,.0f}", refresh=False)
        if step % t["log_interval"] == 0 or step == t["max_steps"] or os.environ.get(FAULT_ENV):
            logger.log({"kind": "train", "step": step, "lr": lr, "tokens_per_s": tok_s,
                        "elapsed_s": time.time() - train_t0, **metrics})
        _fault("kill_after_step", step)
        if step % t["eval_interval"] == 0 or step == t["max_steps"]:
            last_eval = evaluate(engine, data.heldout, t["eval_batch_size"])
            logger.log({"kind": "eval", "step": step, "elapsed_s": time.time() - train_t0, **last_eval})
            if rank == 0 and progress:
                bar.write(f"step {step}: held-out " + ", ".join(f"{k} {v:.1f}" for k, v in last_eval.items()))
        if step % t["save_interval"] == 0 or step == t["max_steps"]:
            save_checkpoint(engine, ckpt_dir, step, position, t["keep_checkpoints"], dist)
    bar.close()
    if not last_eval:  # resumed a run that had already finished
        last_eval = evaluate(engine, data.heldout, t["eval_batch_size"])
    train_seconds = time.time() - train_t0
    final_dir = os.path.join(out_dir, "final")
    export_model(engine, final_dir, tokenizer, dist)
    summary = {"step": step, "heldout": last_eval, "final_dir": final_dir, "tokenizer_dir": os.path.join(out_dir,
               "tokenizer"), "data_seconds": data_seconds, "train_seconds": train_seconds,
               "tokens_per_s": train_tokens / max(train_seconds, 1e-9),
               "unigram_ppl": unigram_perplexity(data.train, data.heldout, vocab_size)}
    logger.log({"kind": "done", **{k: v for k, v in summary.items() if k != "heldout"}})
    logger.close()
    return summary


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="moduleformer-exit pretrain", description=__doc__.split("\n\n")[0])
    p.add_argument("recipe", help="recipe JSON path or bundled recipe name (configs/recipes/)")
    p.add_argument("--output-dir", default=None, help="run directory (default runs/<recipe name>)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe value, e.g. --set training.max_steps=50 (JSON values); repeatable")
    p.add_argument("--no-resume", action="store_true", help="ignore existing checkpoints in the output directory")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        recipe = load_recipe(args.recipe, args.set)
    except (RecipeError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out_dir = args.output_dir or os.path.join("runs", recipe["name"])
    summary = train(recipe, out_dir, resume=not args.no_resume, progress=not args.no_progress)
    shutdown_distributed()
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps({"final_dir": summary["final_dir"], "step": summary["step"], "heldout": summary["heldout"],
                          "unigram_ppl": summary["unigram_ppl"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
