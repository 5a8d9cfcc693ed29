"""The pruning / specialisation / extension report behind ``moduleformer-exit bench --only pruning``.

1. Perplexity vs fraction of MLP experts kept (100/75/50/25 %) for every criterion (random: mean of 3 seeds), on a
   trained model, with parameter count, checkpoint size and greedy decode tokens/s (pruned vs unpruned, side by
   side) and the exit heads' perplexities.
2. Specialisation (the paper's claim): fully fine-tune on a second domain (Python source of the standard library),
   measure usage there, prune to 50 % of MLP experts, second-domain perplexity before and after (usage measured on
   the second domain vs on the first, vs random).
3. Extension: old domain = the Austen corpus, new = Python source; full fine-tune vs adding experts (old ones frozen)
   at the same token budget: new- and old-domain perplexity.

Everything is written to ``RUN_DIR/report.json`` (and PNGs); a finished run is reused unless ``--force``.
"""
from __future__ import annotations

import argparse
import copy
import glob
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import time
from typing import Optional, Sequence

import torch

FRACTIONS = (1.0, 0.75, 0.5, 0.25)
CRITERIA = ("random", "frequency", "gate-mass", "contribution", "loss", "loss-all-heads", "reconstruction")


def python_stdlib_files(packages: Sequence[str] = ("json", "email", "asyncio")) -> list[str]:
    """The new domain: ``*.py`` files of a few standard-library packages of the running interpreter."""
    root = sysconfig.get_paths()["stdlib"]
    files = sorted(f for p in packages for f in glob.glob(os.path.join(root, p, "*.py")))
    if not files:
        raise FileNotFoundError(f"no standard-library sources under {root}")
    return files


def ensure_model(model: Optional[str], cache_dir: str, quick: bool) -> str:
    """A trained multi-exit ModuleFormer: ``model`` if given, else the cached recipe model (trained once)."""
    if model:
        return model
    recipe = "tiny" if quick else "quickstart"
    out = os.path.join(cache_dir, f"pruning-base-{recipe}")
    final = os.path.join(out, "final")
    if not os.path.exists(os.path.join(final, "config.json")):
        cmd = [sys.executable, "-m", "moduleformer_exit.training.pretrain", recipe, "--output-dir", out,
               "--no-progress"]
        print("training the base model:", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)
    return final


def decode_tokens_per_s(model, prompt: torch.Tensor, new_tokens: int) -> float:
    """Greedy decode with the KV cache, batch 1: generated tokens per second (one timed run)."""
    with torch.inference_mode():
        start = time.perf_counter()
        model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                       pad_token_id=0)
        return new_tokens / (time.perf_counter() - start)


def _ppl(model, blocks) -> dict:
    from moduleformer_exit.perplexity import heldout_perplexities

    return heldout_perplexities(model, blocks, batch_size=8)


def criterion_scores(model, criterion: str, calib) -> list:
    """Per-layer MLP expert scores of a score criterion on ``calib`` (loss criteria on its first 16 blocks)."""
    from moduleformer_exit.pruning import collect_expert_usage
    from moduleformer_exit.pruning.plan import loss_scores
    from moduleformer_exit.pruning.select import SCORE_CRITERIA

    if criterion.startswith("loss"):
        heads = "all" if criterion == "loss-all-heads" else "final"
        return loss_scores(model, calib[:16], ["mlp"], heads=heads)["mlp"]
    usage = collect_expert_usage(model, [calib[i:i + 8] for i in range(0, len(calib), 8)], progress=False)
    return usage.scores(SCORE_CRITERIA[criterion], "mlp")


def pruning_curve(base, calib, heldout, run_dir: str, quick: bool, progress=print) -> list[dict]:
    """Section 1 rows: criterion, keep, ppl (final head), exits' ppl, parameters, checkpoint bytes, decode tok/s."""
    from moduleformer_exit.pruning import choose_keep, expert_counts, prune_experts, select_by_scores
    from moduleformer_exit.pruning.io import num_parameters, save_checkpoint

    rows = []
    full = _ppl(base, heldout)
    prompt = heldout[:1, :16]
    new_tokens = 8 if quick else 48
    ckpt = os.path.join(run_dir, "ckpt-tmp")
    base_bytes = save_checkpoint(base, ckpt)
    shutil.rmtree(ckpt)
    speed = {}
    experts, top_k = min(expert_counts(base)["mlp"]), base.config.k_mlp
    scores: dict = {}
    for fraction in FRACTIONS:
        if int(fraction * experts + 0.5) < top_k:
            progress(f"  keep {fraction:.2f}: skipped (fewer than k={top_k} of {experts} experts per layer)")
            continue
        for criterion in CRITERIA:
            if fraction == 1.0 and criterion != "random":
                continue
            seeds = (0, 1, 2) if criterion == "random" and fraction < 1.0 else (0,)
            results = []
            for seed in seeds:
                model = copy.deepcopy(base)
                if fraction < 1.0:
                    if criterion in ("random", "reconstruction"):
                        keep, _ = choose_keep(model, criterion, {"mlp": fraction}, calib, seed=seed)
                    else:  # score criteria: scores measured once on the unpruned model, reused for every budget
                        if criterion not in scores:
                            scores[criterion] = criterion_scores(base, criterion, calib)
                        keep = {"mlp": select_by_scores(scores[criterion], fraction, top_k), "att": None}
                    prune_experts(model, keep)
                results.append(_ppl(model, heldout))
            ppl = {k: sum(r[k] for r in results) / len(results) for k in results[0]}
            row = {"criterion": "none" if fraction == 1.0 else criterion, "keep": fraction, "ppl": ppl["final"],
                   "exits": {k: v for k, v in ppl.items() if k != "final"}, "seeds": len(seeds),
                   "parameters": num_parameters(model)}
            if fraction not in speed:
                row["checkpoint_bytes"] = save_checkpoint(model, ckpt)
                shutil.rmtree(ckpt)
                # Side by side, alternating, best of 3: timings on a shared machine move between runs.
                pruned_t, full_t = [], []
                for _ in range(1 if quick else 3):
                    pruned_t.append(decode_tokens_per_s(model, prompt, new_tokens))
                    full_t.append(decode_tokens_per_s(base, prompt, new_tokens))
                speed[fraction] = {"checkpoint_bytes": row["checkpoint_bytes"], "decode_tok_s": max(pruned_t),
                                   "decode_tok_s_unpruned": max(full_t)}
            row.update(speed[fraction])
            row["size_ratio"] = row["checkpoint_bytes"] / base_bytes
            rows.append(row)
            progress(f"  keep {fraction:.2f} {row['criterion']:>15}: ppl {row['ppl']:.2f}")
    del full
    return rows


def specialisation(base, tuned, austen_calib, py_calib, py_heldout, progress=print) -> list[dict]:
    """Section 2 rows: second-domain perplexity of the fine-tuned model before / after pruning 50 % MLP experts."""
    from moduleformer_exit.pruning import choose_keep, prune_experts

    rows = [{"setting": "fine-tuned, unpruned", "ppl_python": _ppl(tuned, py_heldout)["final"]}]
    for label, criterion, calib, seeds in (("frequency on Python (paper)", "frequency", py_calib, (0,)),
                                           ("contribution on Python", "contribution", py_calib, (0,)),
                                           ("frequency on Austen", "frequency", austen_calib, (0,)),
                                           ("random (3 seeds)", "random", py_calib, (0, 1, 2))):
        ppls = []
        for seed in seeds:
            model = copy.deepcopy(tuned)
            keep, _ = choose_keep(model, criterion, {"mlp": 0.5}, calib, seed=seed)
            prune_experts(model, keep)
            ppls.append(_ppl(model, py_heldout)["final"])
        rows.append({"setting": f"pruned 50 %: {label}", "ppl_python": sum(ppls) / len(ppls)})
        progress(f"  {rows[-1]['setting']}: {rows[-1]['ppl_python']:.2f}")
    rows.append({"setting": "base (not fine-tuned)", "ppl_python": _ppl(base, py_heldout)["final"]})
    return rows


def run(model_dir: str, run_dir: str, quick: bool = False, steps: Optional[int] = None) -> dict:
    """Run the three sections on ``model_dir``; writes ``run_dir/report.json`` and the PNGs."""
    from moduleformer_exit.pruning import add_experts, expert_counts, freeze_old_experts
    from moduleformer_exit.pruning.io import load_moduleformer
    from moduleformer_exit.pruning.plots import perplexity_vs_keep

    from .expert_usage import load_token_blocks
    from .extend import train_steps

    os.makedirs(run_dir, exist_ok=True)
    torch.manual_seed(0)
    start = time.perf_counter()
    base = load_moduleformer(model_dir)
    block = base.config.block_size
    n_calib, n_held = (8, 8) if quick else (32, 32)
    austen_calib, austen_held, _ = load_token_blocks(["bundled:austen"], model_dir, block,
                                                     max_train_blocks=n_calib, max_heldout_blocks=n_held)
    py_train, py_held, _ = load_token_blocks(python_stdlib_files(), model_dir, block, max_heldout_blocks=n_held)
    report: dict = {"model": os.path.abspath(model_dir), "config": {"n_layer": base.config.n_layer,
                    "n_att_experts": base.config.n_att_experts, "n_mlp_experts": base.config.n_mlp_experts,
                    "k_mlp": base.config.k_mlp}, "calibration_blocks": n_calib, "heldout_blocks": n_held,
                    "block_size": block, "python_train_blocks": int(py_train.shape[0])}
    print("1. pruning curve (Austen held-out)", flush=True)
    report["curve"] = pruning_curve(base, austen_calib, austen_held, run_dir, quick)
    perplexity_vs_keep(report["curve"], os.path.join(run_dir, "pruning_curve.png"),
                       "ModuleFormer: held-out ppl vs MLP experts kept")
    steps = steps or (3 if quick else 60)
    batch = 4 if quick else 8
    print(f"2/3. fine-tune and extension on Python source, {steps} steps x {batch} x {block} tokens", flush=True)
    tuned = copy.deepcopy(base)
    full_losses = train_steps(tuned, py_train, steps, batch, lr=1e-3, weight_decay=0.1, seed=0)
    extended = copy.deepcopy(base)
    counts = expert_counts(extended)
    add_experts(extended, n_att=2, n_mlp=4, init="random", seed=0)
    mask = freeze_old_experts(extended, counts)
    ext_losses = train_steps(extended, py_train, steps, batch, lr=1e-3, weight_decay=0.1, mask=mask, seed=0)
    mask.remove()
    report["specialisation"] = specialisation(base, tuned, austen_calib, py_train[:n_calib], py_held)
    report["extension"] = [
        {"model": "base", "ppl_python": _ppl(base, py_held)["final"], "ppl_austen": _ppl(base, austen_held)["final"],
         "trainable": 0},
        {"model": "full fine-tune", "ppl_python": _ppl(tuned, py_held)["final"],
         "ppl_austen": _ppl(tuned, austen_held)["final"],
         "trainable": sum(p.numel() for p in tuned.parameters()), "final_train_loss": full_losses[-1]},
        {"model": "extension (+4 MLP, +2 att experts/layer)", "ppl_python": _ppl(extended, py_held)["final"],
         "ppl_austen": _ppl(extended, austen_held)["final"],
         "trainable": sum((p.shape[0] - n_old) * p[0].numel() for p, n_old in mask.frozen_rows),
         "final_train_loss": ext_losses[-1]},
    ]
    report["train_tokens"] = steps * batch * block
    report["seconds"] = time.perf_counter() - start
    with open(os.path.join(run_dir, "report.json"), "w", encoding="utf-8") as handle:
        json.dump(report, handle, indent=1)
    return report


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m moduleformer_exit.training.pruning_report", description=__doc__)
    p.add_argument("--model", help="trained ModuleFormer checkpoint (default: train and cache a recipe model)")
    p.add_argument("--run-dir", required=True)
    p.add_argument("--cache-dir", default=os.path.expanduser("~/.cache/moduleformer-exit"))
    p.add_argument("--quick", action="store_true", help="tiny sizes: checks the report runs, not its figures")
    p.add_argument("--steps", type=int, help="fine-tune / extension steps (default 60; quick 3)")
    p.add_argument("--force", action="store_true", help="rerun even if RUN_DIR/report.json exists")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    path = os.path.join(args.run_dir, "report.json")
    if args.force or not os.path.exists(path):
        run(ensure_model(args.model, args.cache_dir, args.quick), args.run_dir, args.quick, args.steps)
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
