"""``moduleformer-exit search validate-proxy``: train N small ModuleFormers for the same token budget on the bundled
corpus with the project's trainer, and rank each training-free proxy by its Spearman correlation with held-out
perplexity.

The N architectures are drawn from a small validation space (seeded) and spread over model size: 8 N random valid
candidates are sorted by total parameters and N are taken at evenly spaced ranks. Every run uses the same recipe
(steps, batch, block size, learning-rate schedule, data, tokenizer: the first run's tokenizer is reused), so only the
architecture differs. Each run's result is kept in ``OUT/runs/<id>/result.json`` and reused when the command is run
again. The reported rho is Spearman's between the proxy and *minus* the perplexity: +1 means the proxy orders the
models exactly as their quality.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
from typing import Optional, Sequence

from .objectives import PROXIES, proxies_of
from .space import Architecture, space_from_dict

VALIDATION_SPACE = {
    "fixed": {"vocab_size": 512, "gating_size": 16, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0},
    "dimensions": {
        "n_layer": {"min": 1, "max": 4, "step": 1},
        "n_embd": {"min": 32, "max": 160, "step": 32},
        "n_head": {"choices": [1, 2, 4]},
        "att_hidden": {"choices": [16, 32, 64]},
        "ffd_hidden": {"choices": [32, 64, 128, 256]},
        "n_att_experts": {"choices": [1, 2, 4, 8]},
        "k_att": {"choices": [1, 2]},
        "n_mlp_experts": {"choices": [1, 2, 4, 8]},
        "k_mlp": {"choices": [1, 2]},
    },
}


def pick_architectures(count: int, seed: int) -> list[Architecture]:
    """``count`` distinct architectures of ``VALIDATION_SPACE`` spread evenly over total parameters."""
    space = space_from_dict(VALIDATION_SPACE)
    rng = random.Random(seed)
    pool: dict[str, Architecture] = {}
    for _ in range(8 * count * 4):
        arch = space.sample(rng)
        pool.setdefault(arch.arch_id, arch)
        if len(pool) >= 8 * count:
            break
    ranked = sorted(pool.values(), key=lambda a: (proxies_of(space.to_config(a))["total"], a.arch_id))
    if len(ranked) < count:
        raise ValueError(f"the validation space holds only {len(ranked)} distinct architectures; ask for fewer")
    step = (len(ranked) - 1) / max(1, count - 1)
    return [ranked[round(i * step)] for i in range(count)]


def recipe_for(arch: Architecture, args: argparse.Namespace, tokenizer: Optional[str]) -> dict:
    """The shared training recipe with ``arch``'s sizes."""
    model = {name: value for name, value in arch.to_dict().items()}
    model.update(vocab_size="tokenizer", gating_size=VALIDATION_SPACE["fixed"]["gating_size"],
                 block_size=args.block_size, history_length=args.block_size)
    return {
        "name": f"proxy-{arch.arch_id}",
        "model": model,
        "data": {"files": ["bundled:austen"], "block_size": args.block_size, "vocab_size": args.vocab_size,
                 "tokenizer": tokenizer, "heldout_fraction": 0.05, "max_heldout_blocks": args.heldout_blocks},
        "training": {"max_steps": args.steps, "lr": args.lr, "warmup_steps": max(1, args.steps // 10),
                     "log_interval": args.steps, "eval_interval": args.steps, "save_interval": args.steps,
                     "keep_checkpoints": 1, "eval_batch_size": 32, "seed": args.seed},
        "deepspeed": {"train_micro_batch_size_per_gpu": args.batch_size, "gradient_accumulation_steps": 1,
                      "gradient_clipping": 1.0, "zero_optimization": {"stage": 0}, "bf16": {"enabled": False}},
    }


def spearman_table(results: list[dict]) -> list[dict]:
    """Spearman rho (and its p-value) of every proxy with minus the held-out perplexity, best first.

    Args:
        results: one dict per trained model with every proxy of ``PROXIES`` and ``ppl``.
    """
    from scipy.stats import spearmanr

    rows = []
    for proxy in PROXIES:
        rho, p_value = spearmanr([r[proxy] for r in results], [-r["ppl"] for r in results])
        rows.append({"proxy": proxy, "spearman_rho": float(rho), "p_value": float(p_value)})
    return sorted(rows, key=lambda row: -row["spearman_rho"])


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="moduleformer-exit search validate-proxy", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="run directory (per-model runs and results are cached there)")
    p.add_argument("--configs", type=int, default=12, help="models to train (>= 10 recommended; default 12)")
    p.add_argument("--steps", type=int, default=150, help="training steps per model (same for all)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--block-size", type=int, default=64)
    p.add_argument("--vocab-size", type=int, default=512, help="BPE vocabulary trained on the bundled corpus")
    p.add_argument("--heldout-blocks", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.configs < 3:
        raise SystemExit("--configs must be >= 3 for a rank correlation (>= 10 for a meaningful one)")
    try:  # training needs the train extra; imported here only (search itself never imports training)
        from moduleformer_exit.training.pretrain import shutdown_distributed, train
        from moduleformer_exit.training.recipe import load_recipe
    except ImportError as error:
        raise SystemExit(f"validate-proxy trains models and needs the train extra (pip install -e '.[train]'): "
                         f"{error}")
    from ..configuration import ModuleFormerConfig

    archs = pick_architectures(args.configs, args.seed)
    tokenizer = None
    results = []
    for number, arch in enumerate(archs, 1):
        run_dir = os.path.join(args.out, "runs", arch.arch_id)
        result_path = os.path.join(run_dir, "result.json")
        recipe = load_recipe(recipe_for(arch, args, tokenizer))
        if os.path.isfile(result_path):
            with open(result_path, encoding="utf-8") as handle:
                result = json.load(handle)
        else:
            summary = train(recipe, run_dir, resume=False, progress=False)
            config = ModuleFormerConfig.from_pretrained(summary["final_dir"])
            result = {"id": arch.arch_id, **arch.to_dict(), **proxies_of(config),
                      "ppl": summary["heldout"]["ppl_final"], "unigram_ppl": summary["unigram_ppl"],
                      "train_seconds": summary["train_seconds"],
                      "tokens": args.steps * args.batch_size * args.block_size}
            shutil.rmtree(os.path.join(run_dir, "checkpoints"), ignore_errors=True)  # keep final/ and the log
            with open(result_path, "w", encoding="utf-8") as handle:
                json.dump(result, handle, indent=2)
        tokenizer = tokenizer or os.path.join(run_dir, "tokenizer")
        results.append(result)
        print(f"[{number}/{len(archs)}] {arch.arch_id} total={result['total']:,} "
              f"active_non_embedding={result['active_non_embedding']:,} ppl={result['ppl']:.2f}", flush=True)
    shutdown_distributed()
    table = spearman_table(results)
    report = {"settings": vars(args), "models": results, "spearman": table, "best_proxy": table[0]["proxy"]}
    with open(os.path.join(args.out, "proxy_validation.json"), "w", encoding="utf-8") as handle:
        json.dump(report, handle, indent=2)
    print(f"\nSpearman rho of each proxy with -perplexity ({len(results)} models, "
          f"{results[0]['tokens']:,} training tokens each):")
    for row in table:
        print(f"  {row['proxy']:<22} rho={row['spearman_rho']:+.3f}  p={row['p_value']:.3g}")
    print(f"best proxy: {table[0]['proxy']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
