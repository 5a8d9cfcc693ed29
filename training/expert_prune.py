"""``moduleformer-exit prune``: prune a ModuleFormer checkpoint's experts by a criterion and budget, report held-out
perplexity of the original head and every exit head before and after, save the smaller checkpoint + ``pruning.json``.
"""
from __future__ import annotations

import argparse
import json
import os
from typing import Optional, Sequence

from .expert_usage import load_token_blocks


def build_parser() -> argparse.ArgumentParser:
    from moduleformer_exit.pruning import CRITERIA

    p = argparse.ArgumentParser(prog="moduleformer-exit prune", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="ModuleFormer / multi-exit ModuleFormer checkpoint directory")
    p.add_argument("--data", nargs="+", help="calibration / held-out text files (or bundled:austen)")
    p.add_argument("--keep-mlp", help="MLP experts to keep: a fraction (0.5) or a count per layer (4)")
    p.add_argument("--keep-att", help="attention experts to keep: a fraction (0.75) or a count per layer (6)")
    p.add_argument("--keep-ids", help='explicit kept ids: JSON file {"mlp": [[ids of layer 0], ...], "att": ...}')
    p.add_argument("--criterion", choices=CRITERIA, default="contribution")
    p.add_argument("--spread", choices=("uniform", "global"), default="uniform",
                   help="budget per layer (uniform) or one budget over all layers, spread by score (global)")
    p.add_argument("--heads", choices=("final", "all"), default="final",
                   help="loss criterion: the original head's loss, or its sum with every exit head's (all)")
    p.add_argument("--usage", help="usage.json of this model (from `moduleformer-exit usage`) for score criteria")
    p.add_argument("--calib-blocks", type=int, default=32, help="calibration blocks (default 32)")
    p.add_argument("--heldout-blocks", type=int, default=32, help="held-out blocks for perplexity (default 32)")
    p.add_argument("--block-size", type=int, help="tokens per block (default: the config's block_size)")
    p.add_argument("--max-combinations", type=int, default=5000, help="reconstruction: exhaustive below this")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="output directory of the pruned checkpoint")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    from moduleformer_exit.perplexity import heldout_perplexities
    from moduleformer_exit.pruning import ExpertUsage, choose_keep, prune_experts, write_pruning_record
    from moduleformer_exit.pruning.io import (checkpoint_bytes, load_moduleformer, num_parameters,
                                              save_checkpoint, tokens_hash)
    from moduleformer_exit.pruning.select import parse_budget

    model = load_moduleformer(args.model)
    if args.keep_ids is None and args.keep_mlp is None and args.keep_att is None:
        raise SystemExit("give --keep-mlp and/or --keep-att (a fraction or a count), or --keep-ids FILE")
    if args.data is None:
        raise SystemExit("--data is needed: calibration tokens for the criterion and held-out perplexity")
    block_size = args.block_size or model.config.block_size
    calibration, heldout, tokenizer = load_token_blocks(args.data, args.model, block_size,
                                                        max_train_blocks=args.calib_blocks,
                                                        max_heldout_blocks=args.heldout_blocks)
    before = heldout_perplexities(model, heldout, batch_size=8)
    budgets = {"mlp": parse_budget(args.keep_mlp) if args.keep_mlp else None,
               "att": parse_budget(args.keep_att) if args.keep_att else None}
    info: dict = {}
    if args.keep_ids:
        with open(args.keep_ids, encoding="utf-8") as handle:
            keep = json.load(handle)
        criterion = "explicit"
    else:
        usage = ExpertUsage.load(args.usage) if args.usage else None
        keep, info = choose_keep(model, args.criterion, budgets, calibration, usage=usage, spread=args.spread,
                                 heads=args.heads, seed=args.seed, max_combinations=args.max_combinations,
                                 progress=True)
        criterion = args.criterion
    params_before = num_parameters(model)
    prune_experts(model, keep)
    after = heldout_perplexities(model, heldout, batch_size=8)
    save_checkpoint(model, args.out, tokenizer)
    record = {
        "source": os.path.abspath(args.model), "criterion": criterion, "spread": args.spread, "heads": args.heads,
        "budget": budgets, "kept": keep, "calibration_hash": tokens_hash(calibration),
        "calibration_tokens": int(calibration.numel()), "heldout_tokens": int(heldout.numel()),
        "data": list(args.data), "seed": args.seed,
        "perplexity_before": before, "perplexity_after": after,
        "parameters_before": params_before, "parameters_after": num_parameters(model),
        "checkpoint_bytes_before": checkpoint_bytes(args.model), "checkpoint_bytes_after": checkpoint_bytes(args.out),
        "n_att_experts": model.config.n_att_experts, "n_mlp_experts": model.config.n_mlp_experts,
        **({"reconstruction": {k: v for k, v in info.items() if k != "scores"}} if criterion == "reconstruction"
           else {}),
    }
    write_pruning_record(args.out, record)
    print(json.dumps({k: record[k] for k in ("criterion", "perplexity_before", "perplexity_after",
                                             "parameters_before", "parameters_after", "checkpoint_bytes_before",
                                             "checkpoint_bytes_after")}, indent=1))
    return 0
