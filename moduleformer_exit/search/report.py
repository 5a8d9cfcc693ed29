"""Search outputs: ``pareto.json``, one ready-to-train model config per front member, a CSV of every evaluated
architecture and a PNG of the front (decode latency vs proxy, peak memory as colour, dominated points grey)."""
from __future__ import annotations

import csv
import json
import os

from .evolution import space_arch
from .space import SearchSpace


def model_config_dict(space: SearchSpace, row: dict) -> dict:
    """The ``ModuleFormerConfig`` fields of a row's (pruned, if pruning was searched) architecture, as JSON."""
    config = space.to_config(space_arch(row), pruned=space.include_pruning)
    names = list(space.fixed) + ["n_layer", "n_embd", "n_head", "att_hidden", "ffd_hidden", "n_att_experts", "k_att",
                                 "n_mlp_experts", "k_mlp"]
    return {"model_type": "moduleformer", **{name: getattr(config, name) for name in names}}


def write_outputs(out_dir: str, space: SearchSpace, rows: list[dict], front: list[int], names: list[str],
                  higher_is_better: list[bool], meta: dict) -> dict:
    """Write every output file into ``out_dir``; returns their paths."""
    os.makedirs(os.path.join(out_dir, "configs"), exist_ok=True)
    members = []
    for i in sorted(front, key=lambda i: rows[i]["decode_ms"]):
        row = rows[i]
        path = os.path.join(out_dir, "configs", f"{row['id']}.json")
        with open(path, "w", encoding="utf-8") as handle:
            json.dump(model_config_dict(space, row), handle, indent=2)
        members.append({"id": row["id"], "config": os.path.relpath(path, out_dir),
                        "objectives": {n: row[n] for n in names}, "row": row})
    pareto_path = os.path.join(out_dir, "pareto.json")
    with open(pareto_path, "w", encoding="utf-8") as handle:
        json.dump({**meta, "objectives": names, "higher_is_better": higher_is_better, "evaluated": len(rows),
                   "front": members}, handle, indent=2)
    csv_path = os.path.join(out_dir, "evaluated.csv")
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    front_ids = {rows[i]["id"] for i in front}
    with open(csv_path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns + ["on_front"])
        writer.writeheader()
        for row in rows:
            writer.writerow({**{k: (json.dumps(v) if isinstance(v, list) else v) for k, v in row.items()},
                             "on_front": row["id"] in front_ids})
    png_path = os.path.join(out_dir, "pareto.png")
    plot_front(png_path, rows, front, names[0])
    return {"pareto": pareto_path, "csv": csv_path, "png": png_path, "configs": os.path.join(out_dir, "configs")}


def plot_front(path: str, rows: list[dict], front: list[int], proxy: str) -> None:
    """Scatter decode latency (x) against the proxy (y, log): front members coloured by peak memory, dominated
    feasible points grey, infeasible measured points as grey crosses."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    measured = [r for r in rows if "decode_ms" in r]
    dominated = [r for i, r in enumerate(rows) if r["feasible"] and i not in set(front)]
    infeasible = [r for r in measured if not r["feasible"]]
    if dominated:
        ax.scatter([r["decode_ms"] for r in dominated], [r[proxy] for r in dominated], c="lightgrey", s=18,
                   label=f"dominated ({len(dominated)})")
    if infeasible:
        ax.scatter([r["decode_ms"] for r in infeasible], [r[proxy] for r in infeasible], c="lightgrey", marker="x",
                   s=18, label=f"infeasible ({len(infeasible)})")
    members = sorted((rows[i] for i in front), key=lambda r: r["decode_ms"])
    if members:
        points = ax.scatter([r["decode_ms"] for r in members], [r[proxy] for r in members],
                            c=[r["peak_memory_mb"] for r in members], cmap="viridis", s=40, edgecolors="black",
                            linewidths=0.5, label=f"Pareto front ({len(members)})", zorder=3)
        fig.colorbar(points, ax=ax, label="peak memory (MiB)")
    ax.set_xlabel("decode latency (ms / token)")
    ax.set_ylabel(f"{proxy} parameters" if "flops" not in proxy else proxy)
    ax.set_yscale("log")
    ax.set_title("ModuleFormer architecture search: front over proxy, latency and memory")
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
