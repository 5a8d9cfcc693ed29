"""DeepSpeed pretraining of a ModuleFormer (optionally with exit heads trained jointly) from a recipe.

Launch::

    torchrun --standalone --nproc_per_node N -m moduleformer_exit.training.pretrain RECIPE [--output-dir D]
    deepspeed [--hostfile H] --module moduleformer_exit.training.pretrain RECIPE   # multi-node via a hostfile
    moduleformer-exit pretrain RECIPE          # single process without a launcher (RANK/WORLD_SIZE/... defaulted)

The model owns its loss (a multi-exit model whose config carries the recipe's ``exits`` loss settings, see
``MultiExitMixin.combine_losses``): by default (``exits.loss = "ce"``) ``CE(original head) + exits.loss_weight *
sum_k c_k CE(exit k) + aux_loss_weight * router aux``; ``"shallow_deep"`` is FREE's loss, ``"layerskip"`` LayerSkip's
(optionally with ``exits.layer_dropout``). ``model.model_type`` picks ModuleFormer (default), GPT-2 or GPT-Neo;
``training.init_from`` continues from a multi-exit checkpoint.

Output directory: ``recipe.json``, ``log.jsonl`` (one JSON object per logged step / eval), ``tensorboard/`` (if
installed), ``tokenizer/``, ``checkpoints/step_<N>/`` + ``checkpoints/latest`` (see ``checkpoint.py``: crash-safe,
weights-only resume), ``final/`` (a ``save_pretrained`` multi-exit checkpoint + tokenizer). Before any work starts the
recipe and data files are validated and, on resume, compared with what the checkpoint was trained with
(``run_dir.py``). Every command is offline by default (local files only).
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import random
import sys
import time
from typing import Optional, Sequence

import torch
from torch import nn

from . import checkpoint as ckpt
from .distributed import RendezvousError, init_deepspeed_distributed, offline_by_default, shutdown_distributed
from .logging_utils import JsonlLogger
from .recipe import RecipeError, exit_loss_settings, load_recipe, model_config_class, model_config_kwargs
from .run_dir import (RunMismatchError, check_resume, read_run_info, recover_dir, run_info, save_tokenizer_atomically,
                      write_json_atomically)


# ----------------------------------------------------------------------------------------------- model + optimizer
def build_model(recipe: dict, vocab_size: int, seed: int, tokenizer=None):
    """A multi-exit model (ModuleFormer, GPT-2 or GPT-Neo; or ``training.init_from``'s checkpoint) whose own loss is
    the recipe's: ``exits.loss`` and its settings go into the model config (``combine_losses``)."""
    from moduleformer_exit import MultiExitConfiguration
    from moduleformer_exit.multi_exit_models import AutoMultiExitModel

    torch.manual_seed(seed)
    layers = recipe["exits"]["layers"]
    multi_exit_config = MultiExitConfiguration(lm_head_layer_indices=tuple(layers) if layers else None)
    init_from = recipe["training"]["init_from"]
    if init_from is not None:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(init_from)
        if config.vocab_size != vocab_size:
            raise RecipeError(f"training.init_from's model has {config.vocab_size} tokens, the tokenizer {vocab_size}:"
                              f" set data.tokenizer to the checkpoint's tokenizer.")
        for key, value in exit_loss_settings(recipe).items():
            setattr(config, key, value)
        return AutoMultiExitModel.from_pretrained(init_from, config=config, multi_exit_config=multi_exit_config)
    kwargs = model_config_kwargs(recipe, vocab_size)
    if tokenizer is not None:
        kwargs.update(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                      pad_token_id=tokenizer.pad_token_id)
    config = model_config_class(recipe["model"].get("model_type", "moduleformer"))(**kwargs)
    for key, value in exit_loss_settings(recipe).items():
        setattr(config, key, value)
    return AutoMultiExitModel.from_config(config, multi_exit_config)


def warmup_cosine(warmup: int, total: int, min_ratio: float):
    """LR multiplier: linear warmup to 1 over ``warmup`` steps, cosine to ``min_ratio`` at ``total``."""
    def fn(step: int) -> float:
        if warmup > 0 and step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return fn


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: weight decay on matrices (linear and expert weights), none on norms, biases and
    embeddings (decided by module type, so a tied or renamed embedding stays undecayed)."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.ndim >= 2 and id(p) not in embeddings else no_decay).append(p)
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


def init_engine(deepspeed, model: nn.Module, recipe: dict, world: int):
    """``deepspeed.initialize`` with the recipe's optimizer (client torch AdamW or DeepSpeed's) and schedule."""
    t = recipe["training"]
    schedule = warmup_cosine(t["warmup_steps"], t["max_steps"], t["min_lr_ratio"])
    groups = param_groups(model, t["weight_decay"])
    ds_config = deepspeed_config(recipe, world)
    scheduler = lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, schedule)  # noqa: E731
    if t["optimizer"] == "client":
        optimizer = torch.optim.AdamW(groups, lr=t["lr"], betas=tuple(t["betas"]), eps=t["eps"])
        engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config, lr_scheduler=scheduler)
    else:
        engine, *_ = deepspeed.initialize(model=model, model_parameters=groups, config=ds_config,
                                          lr_scheduler=scheduler)
    return engine, ds_config


# ----------------------------------------------------------------------------------------------- data
def data_kwargs(recipe: dict) -> dict:
    d = recipe["data"]
    return dict(data_format=d["format"], sample_by=d["sample_by"], text_field=d["text_field"],
                streaming=d["streaming"], heldout_fraction=d["heldout_fraction"], seed=d["seed"],
                vocab_size=d["vocab_size"], max_train_blocks=d["max_train_blocks"],
                max_heldout_blocks=d["max_heldout_blocks"], num_proc=d["num_proc"])


def prepare_data(recipe: dict, out_dir: str, rank: int, dist, reuse_tokenizer: bool):
    """Packed train / held-out blocks. Rank 0 trains the tokenizer (or loads the recipe's) and saves it atomically
    to ``out_dir/tokenizer``, unless resuming (``reuse_tokenizer``: the checkpoint's own); other ranks load it."""
    from datasets.utils.logging import disable_progress_bar

    from .data import build_lm_data

    disable_progress_bar()
    d = recipe["data"]
    tok_dir = os.path.join(out_dir, "tokenizer")
    data = None
    if rank == 0:
        data = build_lm_data(d["files"], d["block_size"], tokenizer=tok_dir if reuse_tokenizer else d["tokenizer"],
                             **data_kwargs(recipe))
        if not reuse_tokenizer:
            save_tokenizer_atomically(data.tokenizer, tok_dir)
    dist.barrier()
    if rank != 0:
        data = build_lm_data(d["files"], d["block_size"], tokenizer=tok_dir, **data_kwargs(recipe))
    return data


# ----------------------------------------------------------------------------------------------- checks before work
def preflight(recipe: dict, out_dir: str, resume: bool) -> Optional[str]:
    """Checks that need no DeepSpeed (rank 0; others trust it): repair what a killed save left, validate
    ``checkpoints/latest`` and compare the recipe, data and tokenizer with the checkpoint's. Returns the tag to
    resume, or None for a fresh start. Raises ``CheckpointError`` / ``RunMismatchError`` with the fix."""
    from .data import resolve_data_files

    ckpt_dir = os.path.join(out_dir, "checkpoints")
    if not resume:
        return None
    recover_dir(os.path.join(out_dir, "tokenizer"))
    ckpt.recover(ckpt_dir)
    tag = ckpt.read_pointer(ckpt_dir)
    if tag is None:
        return None
    tag_dir = os.path.join(ckpt_dir, tag)
    current = run_info(recipe, resolve_data_files(recipe["data"]["files"]), os.path.join(out_dir, "tokenizer"))
    accepted = check_resume(read_run_info(tag_dir), current, tag_dir)
    if accepted:
        print(f"resuming {tag_dir} with safe changes: {'; '.join(accepted)}", file=sys.stderr)
    return tag


# ----------------------------------------------------------------------------------------------- export
def export_model(engine, out_dir: str, tokenizer, dist) -> None:
    """``save_pretrained`` (safetensors, fp32) of the multi-exit model + tokenizer; gathers ZeRO-3 partitions."""
    model = engine.module
    if engine.zero_optimization_stage() == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None):
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


def evaluate(engine, blocks: torch.Tensor, batch_size: int) -> dict[str, float]:
    """``{"ppl_final": .., "ppl_exit<k>": ..}`` on the held-out blocks (every rank runs every batch)."""
    from moduleformer_exit.perplexity import heldout_perplexities

    return {f"ppl_{k}": v for k, v in heldout_perplexities(engine, blocks, batch_size).items()}


def loss_parts(out) -> dict[str, torch.Tensor]:
    """The logged parts of the model's loss: ``loss``, ``ce`` (original head), ``ce_exit<k>``, ``aux``."""
    parts = {"loss": out.loss.detach(), "ce": out.lm_loss.detach()}
    for k, v in (out.exit_losses or {}).items():
        parts[f"ce_exit{k}"] = v.detach()
    if out.aux_loss is not None:
        parts["aux"] = out.aux_loss.detach()
    return parts


# ----------------------------------------------------------------------------------------------- main loop
def train(recipe: dict, out_dir: str, resume: bool = True, progress: bool = True) -> dict:
    """Run (or resume) a recipe; returns a summary (final step, held-out perplexities, paths, timings)."""
    offline_by_default()
    if int(os.environ.get("RANK", "0")) == 0:
        preflight(recipe, out_dir, resume)  # fails fast, before DeepSpeed starts
    deepspeed = init_deepspeed_distributed()
    import deepspeed.comm as dist
    from tqdm.auto import tqdm

    from moduleformer_exit.training.data import BlockOrder, batch_positions, resolve_data_files, unigram_perplexity

    rank, world = dist.get_rank(), dist.get_world_size()
    t = recipe["training"]
    ckpt_dir = os.path.join(out_dir, "checkpoints")
    os.makedirs(out_dir, exist_ok=True)
    dist.barrier()
    tag = ckpt.read_pointer(ckpt_dir) if resume else None  # after rank 0's preflight repairs
    t0 = time.time()
    data = prepare_data(recipe, out_dir, rank, dist, reuse_tokenizer=tag is not None)
    tokenizer, vocab_size, data_seconds = data.tokenizer, len(data.tokenizer), time.time() - t0
    info_json = json.dumps(run_info(recipe, resolve_data_files(recipe["data"]["files"]),
                                    os.path.join(out_dir, "tokenizer")), indent=2)
    if rank == 0:
        write_json_atomically(os.path.join(out_dir, "recipe.json"), recipe)

    model = build_model(recipe, vocab_size, t["seed"], tokenizer)
    engine, ds_config = init_engine(deepspeed, model, recipe, world)
    step, position = 0, 0
    if tag is not None:
        client = ckpt.load_checkpoint(engine, ckpt_dir, tag, rank)
        step, position = client["step"], client["position"]
    else:
        torch.manual_seed(t["seed"] + 1000 * rank)
        random.seed(t["seed"] + rank)

    mbs, gas = ds_config["train_micro_batch_size_per_gpu"], ds_config["gradient_accumulation_steps"]
    global_batch, block = ds_config["train_batch_size"], data.train.shape[1]
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
    # the bar only on a terminal: redrawn with \r and ANSI codes, it would litter a log file
    bar = tqdm(total=t["max_steps"], initial=step, disable=not (progress and rank == 0 and sys.stderr.isatty()),
               dynamic_ncols=True, desc=recipe["name"])
    engine.train()
    train_t0, train_tokens = time.time(), 0
    last_eval: dict = {}
    while step < t["max_steps"]:
        step_t0 = time.time()
        totals: dict[str, torch.Tensor] = {}
        for micro in range(gas):
            idx = order.indices(batch_positions(position, micro, rank, world, mbs), mbs)
            x = data.train[idx].to(engine.device)
            out = engine(input_ids=x, labels=x)
            engine.backward(out.loss)
            engine.step()
            for k, v in loss_parts(out).items():
                totals[k] = totals.get(k, 0.0) + v.float() / gas
        position += global_batch
        step += 1
        names = sorted(totals)
        vec = torch.stack([totals[k] for k in names]).to(engine.device)
        dist.all_reduce(vec)
        metrics = {k: float(v) for k, v in zip(names, (vec / world).cpu())}
        dt = time.time() - step_t0
        train_tokens += global_batch * block
        tok_s = global_batch * block / max(dt, 1e-9)
        bar.update(1)
        bar.set_postfix(loss=f"{metrics['loss']:.3f}", tok_s=f"{tok_s:,.0f}", refresh=False)
        if step % t["log_interval"] == 0 or step == t["max_steps"]:
            logger.log({"kind": "train", "step": step, "lr": engine.get_lr()[0], "tokens_per_s": tok_s,
                        "elapsed_s": time.time() - train_t0, **metrics})
        if step % t["eval_interval"] == 0 or step == t["max_steps"]:
            last_eval = evaluate(engine, data.heldout, t["eval_batch_size"])
            logger.log({"kind": "eval", "step": step, "elapsed_s": time.time() - train_t0, **last_eval})
            if rank == 0 and progress:
                bar.write(f"step {step}: held-out " + ", ".join(f"{k} {v:.1f}" for k, v in last_eval.items()))
        if step % t["save_interval"] == 0 or step == t["max_steps"]:
            ckpt.save_checkpoint(engine, ckpt_dir, step, position, t["keep_checkpoints"], dist, info_json)
    bar.close()
    if not last_eval:  # resumed a run that had already finished
        last_eval = evaluate(engine, data.heldout, t["eval_batch_size"])
    train_seconds = time.time() - train_t0
    final_dir = os.path.join(out_dir, "final")
    export_model(engine, final_dir, tokenizer, dist)
    summary = {"step": step, "heldout": last_eval, "final_dir": final_dir,
               "tokenizer_dir": os.path.join(out_dir, "tokenizer"), "data_seconds": data_seconds,
               "train_seconds": train_seconds, "tokens_per_s": train_tokens / max(train_seconds, 1e-9),
               "unigram_ppl": unigram_perplexity(data.train, data.heldout, vocab_size)}
    logger.log({"kind": "done", **{k: v for k, v in summary.items() if k != "heldout"}})
    logger.close()
    return summary


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="moduleformer-exit pretrain", description=__doc__.split("\n\n")[0])
    p.add_argument("recipe", help="recipe JSON path or bundled recipe name (configs/recipes/)")
    p.add_argument("--output-dir", default=None, help="run directory (default: runs/<recipe name>)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe value, e.g. --set training.max_steps=50 (JSON values); repeatable "
                        "(default: none)")
    p.add_argument("--no-resume", action="store_true",
                   help="start afresh (new tokenizer, step 0) even if the output directory has checkpoints; they "
                        "stay until this run's saves replace them (default: resume)")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bar (default: a bar on a terminal)")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    """CLI entry: returns 0, or 2 after printing ``error: ...`` for a bad recipe, run directory or environment."""
    offline_by_default()
    args = build_parser().parse_args(argv)
    try:
        recipe = load_recipe(args.recipe, args.set)
        out_dir = args.output_dir or os.path.join("runs", recipe["name"])
        summary = train(recipe, out_dir, resume=not args.no_resume, progress=not args.no_progress)
    except (RecipeError, FileNotFoundError, ckpt.CheckpointError, RunMismatchError, RendezvousError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    shutdown_distributed()
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps({"final_dir": summary["final_dir"], "step": summary["step"], "heldout": summary["heldout"],
                          "unigram_ppl": summary["unigram_ppl"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
