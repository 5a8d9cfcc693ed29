"""``bench --only early-exit``: early-exit decoding (static, CALM, FREE, self-speculative) against the own
full-depth greedy loop on trained multi-exit models (by default the recipes' 8-layer ModuleFormer, its LayerSkip
continuation and the 8-layer GPT-Neo, cached under ``runs/``): decode tokens/s, agreement with full greedy,
perplexity of the produced text under the full model, layers per token, acceptance, distinct experts per verify; the
T-token forward latency on a 512-token cache; a speed/quality PNG (one panel per model)."""
from __future__ import annotations

import os
from typing import Callable, Optional

import torch

from ..early_exit import BetaMixtureThreshold, EarlyExitConfig, LayerStack, generate_early_exit
from .timing import time_calls

# model directory -> the recipe that trains it (``moduleformer-exit pretrain RECIPE --output-dir runs/<name>``)
DEFAULT_MODELS = {os.path.join("runs", name, "final"): f"configs/recipes/{name}.json"
                  for name in ("early-exit-8l", "early-exit-8l-layerskip", "early-exit-neo-8l")}
DEFAULT_MODEL = ",".join(DEFAULT_MODELS)


def _methods(num_layers: int) -> list[tuple[str, EarlyExitConfig]]:
    """The (label, config) grid measured; exits checked by CALM every 2 layers (head checks are not free). The
    thresholds reach down to 0.1: small models trained briefly have flat distributions (softmax margins < 0.4), and
    FREE's adaptive threshold only recalibrates after tokens did exit, so it starts at 0.4."""
    half, quarter = num_layers // 2, max(1, num_layers // 4)
    rows = [("full", EarlyExitConfig("full"))]
    rows += [(f"static k={k}", EarlyExitConfig("static", exit_layer=k)) for k in (half, num_layers - quarter)]
    rows += [(f"calm t={t}", EarlyExitConfig("calm", threshold=t, min_layer=quarter,
                                             exit_layers=list(range(quarter, num_layers, 2))))
             for t in (0.1, 0.2, 0.4, 0.7)]
    rows += [(f"free S={half} t={t}", EarlyExitConfig("free", exit_layer=half, threshold=t))
             for t in (0.1, 0.2, 0.4, 0.7)]
    rows.append((f"free S={half} adaptive", EarlyExitConfig("free", exit_layer=half, threshold=0.4,
                                                            adaptive_threshold=True)))
    rows += [(f"self-spec k={k} g={g}", EarlyExitConfig("self_speculative", exit_layer=k, gamma=g))
             for k, g in sorted({(1, 4), (quarter, 4), (quarter, 6), (half, 3), (half, 6)})]
    return rows


def _prompts(tokenizer, count: int, prompt_len: int) -> list[torch.Tensor]:
    """``count`` prompts of ``prompt_len`` tokens from the end of the bundled Persuasion text (held out from the
    recipe's training blocks only in the sense of the last file's tail; the perplexity is of generated text)."""
    here = os.path.dirname(os.path.dirname(__file__))
    with open(os.path.join(here, "data", "austen", "persuasion.txt"), encoding="utf-8") as handle:
        text = handle.read()[-60_000:]
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    step = (len(ids) - prompt_len) // count
    return [ids[i * step: i * step + prompt_len][None] for i in range(count)]


@torch.no_grad()
def _perplexity(model, prompt: torch.Tensor, sequence: torch.Tensor) -> float:
    """exp(mean NLL) of ``sequence``'s new tokens given its prompt under the full model (its own causal-LM loss of
    the original head, prompt positions ignored)."""
    labels = sequence.clone()
    labels[:, : prompt.shape[1]] = -100
    return float(model(sequence, labels=labels).lm_loss.exp())


@torch.no_grad()
def forward_latency(model, context: int = 512, max_new: int = 9, repeats: int = 5) -> list[dict]:
    """Median ms of one full-depth forward of T = 1..max_new new tokens on a ``context``-token cache, and the
    distinct experts per block that T tokens touch (why verification costs more on a sparse MoE)."""
    stack = LayerStack(model)
    config = model.config
    cache = stack.new_cache()
    ids = torch.randint(3, config.vocab_size, (1, context + max_new), generator=torch.Generator().manual_seed(0))
    stack.run(stack.embed(ids[:, :context]), 0, stack.num_layers, cache, None)

    def forward(t: int, route: list):
        def run() -> None:
            route.clear()  # keeps the last call's routing
            hidden = stack.run(stack.embed(ids[:, context: context + t], context), 0, stack.num_layers, cache, None,
                               route)
            stack.logits(hidden, stack.num_layers)
            stack.crop(cache, context)  # back to the context: every call sees the same cache (a cheap slice)
        return run

    routes = {t: [] for t in range(1, max_new + 1)}
    times = time_calls({t: forward(t, routes[t]) for t in routes}, repeats)  # interleaved over T
    rows = []
    for t, ms in times.items():
        ms = sorted(ms)
        experts = stack.distinct_experts(routes[t])
        rows.append({"T": t, "ms": ms[len(ms) // 2], "distinct_experts": experts})
    base = rows[0]["ms"]
    for row in rows:
        row["vs_T1"] = row["ms"] / base
    return rows


def bench_early_exit(model, tokenizer, prompts: int = 4, prompt_len: int = 32, new_tokens: int = 48,
                     latency_context: int = 512, repeats: int = 3) -> dict:
    """One run: every method of :func:`_methods` on the same prompts (batch 1, greedy, no EOS stop), side by side.

    Returns ``{"methods": rows, "latency": rows}``; a row has ``method``, ``tokens_per_s``, ``speedup`` (vs the own
    full loop), ``agreement`` (share of positions equal to full greedy), ``exact`` (sequences identical),
    ``ppl`` (full-model perplexity of the produced text), ``layers_per_token``, ``mean_exit_layer``,
    ``acceptance_rate``, ``distinct_experts_per_verify``."""
    stack_layers = model.config.num_hidden_layers
    inputs = _prompts(tokenizer, prompts, prompt_len)
    reference: list[torch.Tensor] = []
    rows = []
    methods = list(_methods(stack_layers))
    results: dict[str, tuple[list, list]] = {}

    def decode_all(label: str, cfg) -> Callable[[], None]:
        calibrator = BetaMixtureThreshold(initial_threshold=cfg.threshold) if cfg.adaptive_threshold else None

        def run() -> None:
            outputs, stats = [], []
            for prompt in inputs:
                out = generate_early_exit(model, prompt, cfg, max_new_tokens=new_tokens, eos_token_id=[],
                                          pad_token_id=0, calibrator=calibrator,
                                          record_experts=cfg.method in ("free", "self_speculative"))
                outputs.append(out.sequences)
                stats.append(out.stats)
            results[label] = (outputs, stats)
        return run

    # every method decodes every prompt, the methods interleaved (one warm-up round), so load hits them alike
    times = time_calls({label: decode_all(label, cfg) for label, cfg in methods}, repeats=repeats)
    reference = results["full"][0]
    rows = []
    for label, _ in methods:
        outputs, stats = results[label]
        seconds = min(times[label]) / 1e3
        agree = sum(float((o[0, prompt_len:] == r[0, prompt_len:]).float().mean()) for o, r in zip(outputs, reference))
        mean = lambda key: (sum(s[key] for s in stats) / len(stats)) if stats[0][key] is not None else None  # noqa
        rows.append({
            "method": label,
            "tokens_per_s": prompts * new_tokens / seconds,
            "agreement": agree / prompts,
            "exact": sum(bool(torch.equal(o, r)) for o, r in zip(outputs, reference)) / prompts,
            "ppl": sum(_perplexity(model, p, o) for p, o in zip(inputs, outputs)) / prompts,
            "layers_per_token": mean("layers_per_token"),
            "mean_exit_layer": mean("mean_exit_layer"),
            "acceptance_rate": mean("acceptance_rate"),
            "distinct_experts_per_verify": mean("distinct_experts_per_verify"),
        })
    base = rows[0]["tokens_per_s"]
    for row in rows:
        row["speedup"] = row["tokens_per_s"] / base
    latency = forward_latency(model, context=latency_context)
    return {"methods": rows, "latency": latency}


def _plot(results: list[dict], path: str) -> None:
    """Speed-up vs agreement with full greedy, one panel per model, one marker family per method, labelled by
    setting."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(6.5 * len(results), 4.5), squeeze=False)
    for ax, result in zip(axes[0], results):
        families = {}
        for row in result["methods"]:
            families.setdefault(row["method"].split()[0], []).append(row)
        for family, members in families.items():
            ax.plot([m["agreement"] for m in members], [m["speedup"] for m in members], "o-", label=family)
            for m in members:
                ax.annotate(m["method"].split(" ", 1)[-1], (m["agreement"], m["speedup"]), fontsize=7)
        ax.axhline(1.0, color="grey", lw=0.5)
        ax.set_xlabel("token agreement with full greedy")
        ax.set_ylabel("decode tokens/s vs full-depth loop")
        ax.set_title(f"{result['model']} (CPU, batch 1)", fontsize=9)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _quick_models() -> list[tuple[str, object, object]]:
    """Random tiny multi-exit models (4 layers, exits 1..3): a ModuleFormer and a GPT-Neo with a local layer."""
    from transformers import GPTNeoConfig

    from ..configuration import ModuleFormerConfig, bundled_config_path
    from ..multi_exit_config import MultiExitConfiguration
    from ..multi_exit_models import AutoMultiExitModel

    config = ModuleFormerConfig.from_json_file(bundled_config_path("moduleformer-tiny"))
    config.n_layer = 4
    neo = GPTNeoConfig(vocab_size=config.vocab_size, hidden_size=64, num_layers=4, num_heads=2,
                       attention_types=[[["global", "local"], 2]], window_size=8, max_position_embeddings=64)

    class _Ids:  # no tokenizer needed: byte ids folded into the vocabulary
        def __call__(self, text, return_tensors=None):
            ids = torch.tensor([[b % (config.vocab_size - 3) + 3 for b in text.encode()]])
            return type("Enc", (), {"input_ids": ids})()

    models = []
    for name, cfg in (("random tiny ModuleFormer", config), ("random tiny GPT-Neo", neo)):
        torch.manual_seed(0)
        models.append((name, AutoMultiExitModel.from_config(cfg, MultiExitConfiguration(
            lm_head_layer_indices=tuple(range(1, 4)))).eval(), _Ids()))
    return models


def _train_missing_default_models(paths: list[str]) -> None:
    """Train (and cache under ``runs/``) the default models that are not there yet, in recipe order (the LayerSkip
    continuation starts from ``runs/early-exit-8l/final``), each by its bundled recipe in a child process (its own
    thread and DeepSpeed settings; progress shown). About 20-40 min per model on a 2-core CPU; runs once."""
    import subprocess
    import sys

    for path, recipe in DEFAULT_MODELS.items():
        if path in paths and not os.path.isdir(path):
            name = os.path.splitext(os.path.basename(recipe))[0]
            run_dir = os.path.dirname(path)
            print(f"bench early-exit: training {name} into {run_dir} (cached for later runs; resumable)", flush=True)
            subprocess.run([sys.executable, "-m", "moduleformer_exit.cli", "pretrain", name, "--output-dir", run_dir],
                           check=True)


def run_early_exit_bench(args, table=None) -> list[dict]:
    """The bench section: every model of ``args.early_exit_model`` (comma-separated directories; or random tiny
    models with ``args.quick``), one result per model; prints the tables with ``table(title, columns, rows)`` when
    given (see :func:`render_early_exit`) and writes ``args.early_exit_plot``."""
    from transformers import AutoTokenizer

    from ..multi_exit_models import AutoMultiExitModel

    results = []
    if args.quick:
        for name, model, ids in _quick_models():
            result = bench_early_exit(model, ids, prompts=1, prompt_len=8, new_tokens=6, latency_context=16)
            results.append({"model": name, **result})
    else:
        paths = [p for p in str(args.early_exit_model).split(",") if p]
        _train_missing_default_models(paths)
        missing = [p for p in paths if not os.path.isdir(p)]
        if missing:
            hints = "; ".join(f"`moduleformer-exit pretrain {DEFAULT_MODELS[p]} --output-dir {os.path.dirname(p)}`"
                              for p in missing if p in DEFAULT_MODELS)
            raise SystemExit(f"bench early-exit needs trained multi-exit models at {', '.join(missing)}"
                             f"{': train them with ' + hints if hints else ''} (or pass --early-exit-model DIR,...).")
        for path in paths:
            model = AutoMultiExitModel.from_pretrained(path).eval()
            tokenizer = AutoTokenizer.from_pretrained(path)
            results.append({"model": f"{path} ({type(model).__name__})",
                            **bench_early_exit(model, tokenizer)})
    if args.early_exit_plot:
        _plot(results, args.early_exit_plot)
    if table is not None:
        render_early_exit(results, table)
    return results


def render_early_exit(results: list[dict], table) -> None:
    """Print the section's two tables per model (methods; forward latency vs new tokens)."""
    for result in results:
        table(f"{result['model']}: early-exit decoding vs the own full-depth greedy loop (batch 1, greedy; "
              f"speedup = tokens/s ratio)",
              [("method", ""), ("tokens_per_s", ".1f"), ("speedup", ".2f"), ("agreement", ".1%"), ("exact", ".0%"),
               ("ppl", ".1f"), ("layers_per_token", ".2f"), ("mean_exit_layer", ".2f"), ("acceptance_rate", ".1%"),
               ("distinct_experts_per_verify", ".1f")], result["methods"])
        table(f"{result['model']}: full-depth forward of T new tokens on a cache (ms; distinct experts per block)",
              [("T", "d"), ("ms", ".2f"), ("vs_T1", ".2f"), ("distinct_experts", ".1f")], result["latency"])
