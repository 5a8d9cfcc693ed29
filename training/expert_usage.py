"""``moduleformer-exit usage``: expert usage of a ModuleFormer checkpoint on text files -> ``usage.json`` + heatmap.

Also holds :func:`load_token_blocks`, the data step shared by ``usage``, ``prune`` and ``extend`` (files ->
byte-level BPE ids with the checkpoint's tokenizer -> packed blocks, through :func:`training.data.build_lm_data`).
"""
from __future__ import annotations

import argparse
import json
import os
from typing import Optional, Sequence

import torch

from .data import build_lm_data


def load_token_blocks(files: Sequence[str], tokenizer_dir: str, block_size: int, heldout_fraction: float = 0.1,
                      seed: int = 1234, max_train_blocks: Optional[int] = None,
                      max_heldout_blocks: Optional[int] = None):
    """``(train [N, T], heldout [M, T], tokenizer)`` blocks of ``files`` tokenized with the checkpoint's tokenizer
    (held-out split by document, seeded)."""
    data = build_lm_data(list(files), block_size, tokenizer=tokenizer_dir, heldout_fraction=heldout_fraction,
                         seed=seed, max_train_blocks=max_train_blocks, max_heldout_blocks=max_heldout_blocks)
    if data.train.shape[0] == 0:
        raise ValueError(f"the data files {list(files)} give no full block of {block_size} tokens.")
    return data.train, data.heldout, data.tokenizer


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="moduleformer-exit usage", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="ModuleFormer / multi-exit ModuleFormer checkpoint directory")
    p.add_argument("--data", required=True, nargs="+", help="text files (or bundled:austen)")
    p.add_argument("--max-tokens", type=int, help="stop after this many tokens (whole batches)")
    p.add_argument("--block-size", type=int, help="tokens per block (default: the config's block_size)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--out", required=True, help="output directory for usage.json and usage.png")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    from moduleformer_exit.pruning import collect_expert_usage
    from moduleformer_exit.pruning.io import load_moduleformer
    from moduleformer_exit.pruning.plots import usage_heatmap

    model = load_moduleformer(args.model)
    block_size = args.block_size or model.config.block_size
    train, heldout, _ = load_token_blocks(args.data, args.model, block_size)
    blocks = torch.cat([train, heldout])
    usage = collect_expert_usage(model, [blocks[i:i + args.batch_size] for i in range(0, len(blocks),
                                                                                       args.batch_size)],
                                 max_tokens=args.max_tokens)
    usage.meta = {"model": os.path.abspath(args.model), "data": list(args.data), "block_size": block_size}
    os.makedirs(args.out, exist_ok=True)
    usage.save(os.path.join(args.out, "usage.json"))
    usage_heatmap(usage, os.path.join(args.out, "usage.png"))
    print(json.dumps({"tokens": usage.tokens, "usage": os.path.join(args.out, "usage.json"),
                      "heatmap": os.path.join(args.out, "usage.png")}))
    return 0
