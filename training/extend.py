"""``moduleformer-exit extend``: append new experts to every layer of a ModuleFormer checkpoint and train only them
(and their router rows) on new data through DeepSpeed (ZeRO stage 0, fp32; CPU: gloo), everything else frozen by a
gradient mask on the stacked tensors; held-out perplexity on the new (and optionally old) domain before and after.

``--full`` instead fine-tunes every parameter with the same trainer and budget (the dense baseline of forgetting).
The training loss is the original head's next-token loss (plus ``aux_loss_weight * aux`` from the config).
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import time
from typing import Optional, Sequence

import torch
from torch import nn

from .expert_usage import load_token_blocks


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_deepspeed():
    """Import DeepSpeed for a single process without a launcher (CPU: skip the shm comm op's JIT build, gloo)."""
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
    import deepspeed

    if not torch.cuda.is_available():
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    import deepspeed.comm as dist

    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    return deepspeed


def _lm_loss(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = model(input_ids=x, labels=x, use_cache=False)
    loss = out.lm_loss if getattr(out, "lm_loss", None) is not None else out.loss
    weight = float(getattr(model.config, "aux_loss_weight", 0.0) or 0.0)
    if weight > 0 and getattr(out, "aux_loss", None) is not None:
        loss = loss + weight * out.aux_loss
    return loss


def train_steps(model: nn.Module, blocks: torch.Tensor, steps: int, batch_size: int = 8, lr: float = 1e-3,
                weight_decay: float = 0.1, mask=None, seed: int = 0, progress: bool = False) -> list[float]:
    """``steps`` AdamW steps through ``deepspeed.initialize`` on batches of ``blocks`` ``[N, T]`` (seeded order).

    With ``mask`` (an :class:`~moduleformer_exit.pruning.extend.ExtensionMask`): only its stacked tensors train,
    in a zero-decay group, with decoupled decay applied to their new rows before each step. Without: every
    parameter trains (decay on >= 2-D tensors except the embedding). Returns the loss of every step.
    """
    deepspeed = init_deepspeed()
    from tqdm.auto import tqdm

    if mask is not None:
        groups = [{"params": mask.parameters, "weight_decay": 0.0}]
    else:
        decay = [p for n, p in model.named_parameters() if p.requires_grad and p.ndim >= 2 and "wte" not in n]
        other = [p for n, p in model.named_parameters() if p.requires_grad and not (p.ndim >= 2 and "wte" not in n)]
        groups = [{"params": decay, "weight_decay": weight_decay}, {"params": other, "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), eps=1e-8)
    config = {"train_micro_batch_size_per_gpu": batch_size, "gradient_accumulation_steps": 1,
              "train_batch_size": batch_size, "zero_optimization": {"stage": 0}, "steps_per_print": 10 ** 9,
              "wall_clock_breakdown": False}
    engine, optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    engine.train()
    generator = torch.Generator().manual_seed(seed)
    losses = []
    order = torch.randperm(blocks.shape[0], generator=generator)
    position = 0
    for _ in tqdm(range(steps), desc="extend" if mask is not None else "fine-tune", disable=not progress):
        if position + batch_size > len(order):
            order, position = torch.randperm(blocks.shape[0], generator=generator), 0
        x = blocks[order[position:position + batch_size]].to(engine.device)
        position += batch_size
        loss = _lm_loss(engine.module, x)
        engine.backward(loss)
        if mask is not None:
            mask.decay_new_slices(optimizer.param_groups[0]["lr"], weight_decay)
        engine.step()
        losses.append(float(loss.detach()))
    return losses


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="moduleformer-exit extend", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="ModuleFormer / multi-exit ModuleFormer checkpoint directory")
    p.add_argument("--data", required=True, nargs="+", help="new-domain text files")
    p.add_argument("--old-data", nargs="+", help="old-domain text files: held-out perplexity before/after (forgetting)")
    p.add_argument("--add-mlp", type=int, default=0, help="MLP experts to add per layer")
    p.add_argument("--add-att", type=int, default=0, help="attention experts to add per layer")
    p.add_argument("--init", choices=("random", "clone"), default="random")
    p.add_argument("--full", action="store_true", help="baseline: fine-tune every parameter, add nothing")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--heldout-blocks", type=int, default=32)
    p.add_argument("--block-size", type=int, help="tokens per block (default: the config's block_size)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    return p


def run_extension(model_dir: str, data: Sequence[str], out: str, add_mlp: int = 0, add_att: int = 0,
                  init: str = "random", full: bool = False, steps: int = 100, batch_size: int = 8, lr: float = 1e-3,
                  weight_decay: float = 0.1, old_data: Optional[Sequence[str]] = None, heldout_blocks: int = 32,
                  block_size: Optional[int] = None, seed: int = 0, progress: bool = True) -> dict:
    """Extend (or, with ``full``, fully fine-tune) ``model_dir`` on ``data``; save to ``out`` with
    ``extension.json`` (perplexities before/after on the new and old domains, step losses, expert counts)."""
    from moduleformer_exit.perplexity import heldout_perplexities
    from moduleformer_exit.pruning import add_experts, expert_counts, freeze_old_experts
    from moduleformer_exit.pruning.io import load_moduleformer, num_parameters, save_checkpoint

    torch.manual_seed(seed)
    model = load_moduleformer(model_dir)
    block_size = block_size or model.config.block_size
    train, heldout, tokenizer = load_token_blocks(data, model_dir, block_size, max_heldout_blocks=heldout_blocks)
    old_heldout = (load_token_blocks(old_data, model_dir, block_size, max_heldout_blocks=heldout_blocks)[1]
                   if old_data else None)

    def evaluate() -> dict:
        result = {"new": heldout_perplexities(model, heldout, batch_size=8)["final"]}
        if old_heldout is not None:
            result["old"] = heldout_perplexities(model, old_heldout, batch_size=8)["final"]
        return result

    before = evaluate()
    old_counts = expert_counts(model)
    mask = None
    if not full:
        add_experts(model, n_att=add_att, n_mlp=add_mlp, init=init, seed=seed)
        mask = freeze_old_experts(model, old_counts)
    trainable = (sum((p.shape[0] - n_old) * p[0].numel() for p, n_old in mask.frozen_rows) if mask is not None
                 else sum(p.numel() for p in model.parameters()))
    start = time.perf_counter()
    losses = train_steps(model, train, steps, batch_size, lr, weight_decay, mask, seed, progress)
    seconds = time.perf_counter() - start
    if mask is not None:
        mask.remove()
    for p in model.parameters():
        p.requires_grad_(True)
    after = evaluate()
    save_checkpoint(model, out, tokenizer)
    record = {"source": os.path.abspath(model_dir), "mode": "full" if full else "extend", "init": init,
              "add_mlp": add_mlp, "add_att": add_att, "steps": steps, "batch_size": batch_size, "lr": lr,
              "weight_decay": weight_decay, "train_tokens": steps * batch_size * block_size,
              "perplexity_before": before, "perplexity_after": after, "losses": losses, "seconds": seconds,
              "trainable_parameters": trainable, "parameters": num_parameters(model),
              "n_att_experts": model.config.n_att_experts, "n_mlp_experts": model.config.n_mlp_experts}
    with open(os.path.join(out, "extension.json"), "w", encoding="utf-8") as handle:
        json.dump(record, handle, indent=1)
    return record


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if not args.full and args.add_mlp == 0 and args.add_att == 0:
        raise SystemExit("give --add-mlp and/or --add-att (experts per layer), or --full for the dense baseline")
    record = run_extension(args.model, args.data, args.out, args.add_mlp, args.add_att, args.init, args.full,
                           args.steps, args.batch_size, args.lr, args.weight_decay, args.old_data,
                           args.heldout_blocks, args.block_size, args.seed)
    print(json.dumps({k: record[k] for k in ("mode", "perplexity_before", "perplexity_after", "trainable_parameters",
                                             "seconds")}, indent=1))
    return 0
