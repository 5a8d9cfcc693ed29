"""``bench --only pruning``: runs the pruning / specialisation / extension report (``training.pruning_report``, in a
child process: the benchmarks do not import ``training``) and returns its rows for the CLI's tables."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Optional

CURVE_COLUMNS = [("criterion", ""), ("keep", ".2f"), ("ppl", ".2f"), ("exit_ppl", ""), ("parameters", ",d"),
                 ("checkpoint_bytes", ",d"), ("size_ratio", ".2f"), ("decode_tok_s", ".1f"),
                 ("decode_tok_s_unpruned", ".1f")]
SPECIALISATION_COLUMNS = [("setting", ""), ("ppl_python", ".2f")]
EXTENSION_COLUMNS = [("model", ""), ("ppl_python", ".2f"), ("ppl_austen", ".2f"), ("trainable", ",d")]


def bench_pruning(run_dir: str, model: Optional[str] = None, quick: bool = False, force: bool = False,
                  threads: Optional[int] = None) -> dict:
    """Run (or reuse) the report in ``run_dir``; returns ``report.json`` with ``exit_ppl`` strings on curve rows."""
    cmd = [sys.executable, "-m", "moduleformer_exit.training.pruning_report", "--run-dir", run_dir]
    cmd += (["--model", model] if model else []) + (["--quick"] if quick else []) + (["--force"] if force else [])
    cmd += ["--threads", str(threads)] if threads else []
    subprocess.run(cmd, check=True)
    with open(os.path.join(run_dir, "report.json"), encoding="utf-8") as handle:
        report = json.load(handle)
    for row in report["curve"]:
        row["exit_ppl"] = " ".join(f"{k[4:]}:{v:.1f}" for k, v in sorted(row["exits"].items()))
    return report


def render_pruning_report(report: dict, table) -> None:
    """Print the report's three tables with ``table(title, columns, rows)`` and where its files are."""
    table(f"Held-out ppl (Austen) vs MLP experts kept, per criterion (random: mean of 3 seeds); {report['model']}",
          CURVE_COLUMNS, report["curve"])
    table("Specialisation: fully fine-tuned on Python source, then pruned to 50 % of MLP experts",
          SPECIALISATION_COLUMNS, report["specialisation"])
    table(f"Extension vs full fine-tune at the same budget ({report['train_tokens']} Python tokens each)",
          EXTENSION_COLUMNS, report["extension"])
    run_dir = report.get("run_dir", "")
    print(f"report: {os.path.join(run_dir, 'report.json')}, plot: {os.path.join(run_dir, 'pruning_curve.png')}")
