"""``moduleformer-exit quickstart``: offline, on the bundled Austen corpus, in a single process through DeepSpeed:
train a byte-level BPE tokenizer and a small ModuleFormer with exit heads (recipe ``configs/recipes/quickstart.json``),
print per-exit held-out perplexity against the unigram baseline, generate with the original head and with ACD,
and save a loss-curve PNG."""
from __future__ import annotations

import json
import os
import sys
import time
from typing import Optional, Sequence

from .distributed import offline_by_default


def plot_loss_curve(log_path: str, png_path: str) -> str:
    """Training loss (original head and exits) and held-out perplexity points from ``log.jsonl`` -> PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train: dict[int, dict] = {}
    for line in open(log_path):
        rec = json.loads(line)
        if rec.get("kind") == "train":
            train[rec["step"]] = rec
    steps = sorted(train)
    fig, ax = plt.subplots(figsize=(7, 4))
    keys = sorted(k for k in train[steps[-1]] if k.startswith("ce"))
    for k in keys:
        label = "final head" if k == "ce" else k[3:].replace("exit", "exit ")
        ax.plot(steps, [train[s].get(k) for s in steps], label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("training cross-entropy (nats)")
    ax.set_title("ModuleFormer quickstart (bundled Austen corpus)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    return png_path


def generate_samples(final_dir: str, prompt: str, max_new_tokens: int = 40) -> dict[str, str]:
    """Greedy continuations with the original head and with ACD (top exit vs the lowest exit)."""
    import torch
    from transformers import AutoTokenizer

    from moduleformer_exit import AutoMultiExitModel, MultiExitConfiguration

    tok = AutoTokenizer.from_pretrained(final_dir)
    model = AutoMultiExitModel.from_pretrained(final_dir).eval()
    ids = tok(prompt, return_tensors="pt").input_ids
    out = {}
    layers = model.exit_layers
    settings = [("original head", MultiExitConfiguration(use_original_head=True))]
    if layers:
        settings.append((f"ACD (original vs exit {layers[0]})", MultiExitConfiguration(
            use_original_head=False, contrast_layer_indices=("original", layers[0]))))
    for name, cfg in settings:
        model.set_multi_exit_config(cfg)
        with torch.no_grad():
            gen = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, repetition_penalty=1.2,
                                 pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        out[name] = tok.decode(gen[0, ids.shape[1]:], skip_special_tokens=True)
    return out


def run_quickstart(output_dir: str = "runs/quickstart", max_steps: Optional[int] = None,
                   overrides: Sequence[str] = (), prompt: str = "It is a truth universally acknowledged, that",
                   progress: bool = True) -> dict:
    offline_by_default()
    from .pretrain import train
    from .recipe import load_recipe

    t0 = time.time()
    extra = list(overrides)
    if max_steps is not None:
        extra.append(f"training.max_steps={max_steps}")
        extra.append(f"training.warmup_steps={max(0, min(30, max_steps // 10))}")
        extra.append(f"training.eval_interval={max_steps}")
        extra.append(f"training.save_interval={max_steps}")
    recipe = load_recipe("quickstart", extra)
    summary = train(recipe, output_dir, resume=False, progress=progress)
    ppl = summary["heldout"]
    unigram = summary["unigram_ppl"]
    print()
    print(f"Held-out perplexity after {summary['step']} steps (unigram baseline {unigram:.1f}):")
    print(f"  {'head':<12}{'perplexity':>12}{'vs unigram':>12}")
    for key, value in ppl.items():
        name = key[len("ppl_"):]
        print(f"  {name:<12}{value:12.1f}{value / unigram:11.2f}x")
    samples = generate_samples(summary["final_dir"], prompt)
    print(f"\nPrompt: {prompt!r}")
    for name, text in samples.items():
        print(f"  [{name}] {text!r}")
    png = plot_loss_curve(os.path.join(output_dir, "log.jsonl"), os.path.join(output_dir, "loss_curve.png"))
    elapsed = time.time() - t0
    print(f"\nModel + tokenizer: {summary['final_dir']}   loss curve: {png}   "
          f"({summary['tokens_per_s']:,.0f} tokens/s, {elapsed:.0f} s in all)")
    return {"perplexity": ppl, "unigram_ppl": unigram, "samples": samples, "png": png, "seconds": elapsed,
            "final_dir": summary["final_dir"]}


def main(argv: Optional[Sequence[str]] = None) -> int:
    import argparse

    offline_by_default()

    p = argparse.ArgumentParser(prog="moduleformer-exit quickstart", description=__doc__.split("\n\n")[0])
    p.add_argument("--output-dir", default="runs/quickstart", help="run directory (default: runs/quickstart)")
    p.add_argument("--max-steps", type=int, default=None, help="override the recipe's step count")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a recipe value")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bar (default: shown)")
    args = p.parse_args(argv)
    run_quickstart(args.output_dir, args.max_steps, args.set, progress=not args.no_progress)
    return 0


if __name__ == "__main__":
    sys.exit(main())
