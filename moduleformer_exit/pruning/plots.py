"""PNG figures of the pruning tools: a usage heatmap (layers x experts, one panel per kind) and perplexity against
the fraction of experts kept (one line per criterion)."""
from __future__ import annotations

from typing import Sequence

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def usage_heatmap(usage, path: str, statistic: str = "counts") -> str:
    """Heatmap of one usage statistic, normalised per layer (share of the layer's total); NaN past a layer's
    experts when counts differ per layer."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.5))
    for ax, kind, title in zip(axes, ("att", "mlp"), ("attention experts (MoA)", "MLP experts")):
        rows = usage.stats[statistic][kind]
        width = max(len(r) for r in rows)
        grid = np.full((len(rows), width), np.nan)
        for i, r in enumerate(rows):
            total = sum(r) or 1.0
            grid[i, : len(r)] = np.asarray(r) / total
        image = ax.imshow(grid, aspect="auto", cmap="viridis")
        ax.set_xticks(range(width))
        ax.set_yticks(range(len(rows)))
        ax.set_xlabel("expert")
        ax.set_ylabel("layer")
        ax.set_title(f"{title}: {statistic} share")
        fig.colorbar(image, ax=ax)
    fig.suptitle(f"expert usage over {usage.tokens} tokens")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def perplexity_vs_keep(rows: Sequence[dict], path: str, title: str) -> str:
    """Line plot: ``rows`` with ``criterion``, ``keep`` (fraction) and ``ppl`` keys; a ``criterion="none"`` row (the
    unpruned model) is the first point of every line."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    start = [(r["keep"], r["ppl"]) for r in rows if r["criterion"] == "none"]  # the unpruned model starts each line
    for criterion in dict.fromkeys(r["criterion"] for r in rows if r["criterion"] != "none"):
        pts = sorted(start + [(r["keep"], r["ppl"]) for r in rows if r["criterion"] == criterion])
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=criterion)
    ax.set_xlabel("fraction of MLP experts kept")
    ax.set_ylabel("held-out perplexity (final head)")
    ax.set_yscale("log")
    ax.invert_xaxis()
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
