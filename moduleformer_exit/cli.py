"""``moduleformer-exit`` command line: ``bench`` (benchmark tables) and ``generate`` (streamed generation with the
original head, one exit, or ACD); training: ``quickstart``, ``pretrain``, ``finetune``, ``train-exits``."""
from __future__ import annotations

import argparse
import json
import platform
import sys
from typing import Optional, Sequence

import torch

BENCH_SECTIONS = ("moe", "attention", "decode", "acd", "training", "peers", "pruning")


def _table(title: str, columns: Sequence[tuple[str, str]], rows: list[dict]) -> None:
    """Print ``rows`` as a rich table; ``columns`` are (key, format) pairs."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for key, _ in columns:
        table.add_column(key, justify="right")
    for row in rows:
        table.add_row(*[("-" if row.get(key) is None else format(row[key], fmt)) for key, fmt in columns])
    Console(width=160).print(table)


def run_bench(args: argparse.Namespace) -> int:
    """Run the selected benchmark sections (one process, one run) and print their tables."""
    sections = BENCH_SECTIONS if args.only is None else tuple(args.only.split(","))
    unknown = set(sections) - set(BENCH_SECTIONS)
    if unknown:
        raise SystemExit(f"unknown bench section(s) {sorted(unknown)}; choose from {', '.join(BENCH_SECTIONS)}")
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, threads={args.threads}, "
          f"fp32{' (quick sizes)' if args.quick else ''}")
    results: dict[str, list[dict]] = {}
    if "moe" in sections:
        from .benchmarks.moe import bench_moe_mlp

        shapes = ((256, 64, 64, 8, 2),) if args.quick else ((4096, 1024, 1024, 32, 2), (4096, 1024, 256, 64, 4))
        results["moe"] = bench_moe_mlp(shapes=shapes, threads=args.threads, naive=True,
                                       **({"repeats": 2} if args.quick else {}))
        _table("MoE MLP layer vs dense GEMM pair of equal active FLOPs (efficiency = dense / MoE; naive = IBM-style "
               "Python loop over experts)",
               [("N", "d"), ("d", "d"), ("h", "d"), ("E", "d"), ("k", "d"), ("fwd_moe_ms", ".1f"),
                ("fwd_dense_ms", ".1f"), ("fwd_eff", ".2f"), ("fwdbwd_moe_ms", ".1f"), ("fwdbwd_dense_ms", ".1f"),
                ("fwdbwd_eff", ".2f"), ("naive_fwd_ms", ".1f"), ("naive_fwdbwd_ms", ".1f")], results["moe"])
    if "attention" in sections:
        from .benchmarks.attention import bench_stick_breaking

        seq_lens = (64, 128) if args.quick else (512, 1024, 2048)
        rows = []
        for skip, setting in ((True, "underflow skip (default)"), (False, "full walk (worst case)")):
            for row in bench_stick_breaking(seq_lens=seq_lens, threads=args.threads, skip_underflow=skip,
                                            **({"repeats": 2} if args.quick else {})):
                rows.append({"setting": setting, **row})
        results["attention"] = rows
        _table("Stick-breaking attention fwd vs SDPA(is_causal) (B=1, 16 query heads, head_dim 64, N(0,1) inputs)",
               [("setting", ""), ("T", "d"), ("sb_ms", ".1f"), ("sdpa_ms", ".1f"), ("ratio", ".2f"),
                ("sb_peak_mb", ".1f"), ("sdpa_peak_mb", ".1f")], results["attention"])
    if "decode" in sections:
        from .benchmarks.decode import bench_decode

        if args.quick:
            from .configuration import ModuleFormerConfig, bundled_config_path

            config = ModuleFormerConfig.from_json_file(bundled_config_path("moduleformer-tiny"))
            results["decode"] = bench_decode(batch_sizes=(1, 2), prompt_len=4, new_tokens=4, config=config,
                                             threads=args.threads, repeats=1)
        else:
            results["decode"] = bench_decode(threads=args.threads)
        _table("Greedy decode with KV cache (HF generate)",
               [("batch", "d"), ("prompt_len", "d"), ("new_tokens", "d"), ("seconds", ".2f"),
                ("tokens_per_s", ".1f"), ("active_params", ",d")], results["decode"])
        from .benchmarks.decode_limit import DECODE_LIMIT_COLUMNS, bench_decode_limit

        results["decode_limit"] = (bench_decode_limit(config=config, batch_sizes=(1,), prompt_len=4, new_tokens=3,
                                                      threads=args.threads, repeats=1)
                                   if args.quick else bench_decode_limit(threads=args.threads))
        _table("Decode step vs the memory-bandwidth limit (a chain of GEMVs over the same active weights; "
               "of_limit = limit / step)", DECODE_LIMIT_COLUMNS, results["decode_limit"])
    if "acd" in sections:
        from .benchmarks.decode import bench_acd_decode

        if args.quick:
            from .configuration import ModuleFormerConfig, bundled_config_path

            config = ModuleFormerConfig.from_json_file(bundled_config_path("moduleformer-tiny"))
            results["acd"] = bench_acd_decode(prompt_len=4, new_tokens=4, config=config, threads=args.threads,
                                              repeats=1)
        else:
            results["acd"] = bench_acd_decode(threads=args.threads)
        _table("ACD greedy decode vs plain greedy, same model (batch 1; overhead = time / plain - 1)",
               [("mode", ""), ("batch", "d"), ("new_tokens", "d"), ("seconds", ".2f"), ("tokens_per_s", ".1f"),
                ("overhead", "+.1%")], results["acd"])
    if "training" in sections:
        try:
            from .benchmarks.training import bench_training
        except ImportError as error:  # the train extra is optional
            raise SystemExit(f"bench training needs the train extra (pip install -e '.[train]'): {error}")
        results["training"] = (bench_training(stages=(0,), steps=2, warmup=1, batch_size=4, seq_len=32)
                               if args.quick else bench_training(threads=args.threads))
        _table("Training step: DeepSpeed ZeRO stages vs a plain PyTorch loop, same model and batch (1 process)",
               [("mode", ""), ("stage", ""), ("step_ms", ".1f"), ("tokens_per_s", ",.0f"), ("overhead_pct", "+.1f"),
                ("peak_rss_mb", ".0f"), ("peak_delta_mb", ".0f")], results["training"])
    if "pruning" in sections:
        from .benchmarks.pruning import run_pruning_section

        results["pruning"] = run_pruning_section(args, _table)
    if "peers" in sections:
        from .benchmarks.peers import PEERS_COLUMNS, bench_peers

        results["peers"] = bench_peers(threads=args.threads, quick=args.quick)
        _table("ModuleFormer vs transformers' JetMoE, matched shapes and active parameters (fp32; ratio = our "
               "throughput / JetMoE's, fastest of interleaved runs)", PEERS_COLUMNS, results["peers"])
    if args.device == "cuda":
        run_cuda_bench(args, results)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(results, handle, indent=2)
    return 0


def _parse_contrast(text: str) -> tuple:
    parts = [p.strip() for p in text.replace(";", ",").split(",")]
    if len(parts) != 2:
        raise SystemExit(f"--contrast takes two layers 'UPPER,LOWER' (e.g. original,12), got {text!r}")
    return tuple(p if p.lower() == "original" else int(p) for p in parts)


def load_for_generation(model_dir: str, contrast: Optional[str] = None, exit_layer: Optional[int] = None,
                        alpha: float = 0.1):
    """Load a causal LM for generation: a multi-exit model (ModuleFormer, GPT-2, GPT-Neo) when an exit or contrast
    is asked for or the checkpoint has exit heads, otherwise a plain ``AutoModelForCausalLM``."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from . import AutoMultiExitModel, MultiExitConfiguration

    config = AutoConfig.from_pretrained(model_dir)
    if contrast is not None and exit_layer is not None:
        raise SystemExit("use either --contrast or --exit, not both")
    if contrast is not None:
        runtime = MultiExitConfiguration(use_original_head=False, contrast_layer_indices=_parse_contrast(contrast),
                                         alpha=alpha)
    elif exit_layer is not None:
        runtime = MultiExitConfiguration(use_original_head=False, output_layer_index=exit_layer)
    elif getattr(config, "lm_head_layer_indices", None):
        runtime = MultiExitConfiguration()
    else:
        return AutoModelForCausalLM.from_pretrained(model_dir).eval()
    return AutoMultiExitModel.from_pretrained(model_dir, runtime).eval()


def run_generate(args: argparse.Namespace) -> int:
    """Generate from a prompt, streaming tokens to stdout as they are produced."""
    from transformers import AutoTokenizer, TextStreamer

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = load_for_generation(args.model, args.contrast, args.exit, args.alpha)
    inputs = tokenizer(args.prompt, return_tensors="pt")
    if args.seed is not None:
        torch.manual_seed(args.seed)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    streamer = TextStreamer(tokenizer, skip_special_tokens=True)
    with torch.inference_mode():
        model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=args.do_sample,
                       temperature=args.temperature if args.do_sample else None,
                       top_k=args.top_k if args.do_sample else None, top_p=args.top_p if args.do_sample else None,
                       num_beams=args.num_beams, pad_token_id=pad_id, streamer=streamer)
    return 0


def run_cuda_bench(args: argparse.Namespace, results: dict) -> None:
    """GPU kernel rows (``--device cuda``): Triton routed experts, Triton stick-breaking vs SDPA, a training step."""
    if not torch.cuda.is_available():
        raise SystemExit("--device cuda needs a CUDA GPU (none is visible to torch)")
    from .benchmarks.attention_cuda import bench_stick_breaking_cuda
    from .benchmarks.kernels_cuda import TABLE_COLUMNS, bench_expert_kernels_cuda
    from .benchmarks.model_cuda import bench_training_step_cuda

    results["cuda_experts"] = bench_expert_kernels_cuda()
    _table("GPU routed expert MLP vs dense GEMM pair of equal active FLOPs (bf16; eff = dense / path)", TABLE_COLUMNS,
           results["cuda_experts"])
    results["cuda_attention"] = bench_stick_breaking_cuda()
    _table("GPU stick-breaking (Triton) vs SDPA(is_causal), bf16, head_dim 64",
           [("T", "d"), ("B", "d"), ("sb_fwd_ms", ".3f"), ("sdpa_fwd_ms", ".3f"), ("ratio_fwd", ".2f"),
            ("sb_fwdbwd_ms", ".3f"), ("sdpa_fwdbwd_ms", ".3f"), ("ratio_fwdbwd", ".2f"), ("sb_fwdbwd_peak_mb", ".0f"),
            ("sdpa_fwdbwd_peak_mb", ".0f")], results["cuda_attention"])
    results["cuda_training"] = [row for backend in ("triton", "torch") for row in bench_training_step_cuda(backend=backend)]
    _table("GPU training step, ~350M-active ModuleFormer (bf16, fused AdamW)",
           [("backend", ""), ("batch", "d"), ("seq_len", "d"), ("step_ms", ".1f"), ("tokens_per_s", ",.0f"),
            ("tflops", ".1f"), ("mfu", ".1%"), ("host_syncs", "d")], results["cuda_training"])


def build_parser() -> argparse.ArgumentParser:
    """The ``moduleformer-exit`` argument parser."""
    parser = argparse.ArgumentParser(prog="moduleformer-exit", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    bench = sub.add_parser("bench", help="print benchmark tables (MoE layer, stick-breaking attention, decode, ACD)")
    bench.add_argument("--only", help=f"comma-separated subset of {','.join(BENCH_SECTIONS)}")
    bench.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    bench.add_argument("--quick", action="store_true", help="tiny sizes: checks the command runs, not speed")
    bench.add_argument("--json", help="also write the rows to this JSON file")
    bench.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                       help="cuda: also run the GPU kernel rows (Triton experts, stick-breaking, training step)")
    bench.add_argument("--pruning-model", help="pruning: trained ModuleFormer dir (default: train + cache a recipe)")
    bench.add_argument("--pruning-run-dir", help="pruning: run directory, reused when finished")
    bench.set_defaults(func=run_bench)
    gen = sub.add_parser("generate", help="generate text (original head, one exit with --exit, or ACD with --contrast)")
    gen.add_argument("prompt")
    gen.add_argument("--model", required=True, help="checkpoint directory with config, weights and tokenizer")
    gen.add_argument("--contrast", help="ACD between two layers: UPPER,LOWER (e.g. original,12 or 24,12)")
    gen.add_argument("--exit", type=int, help="decode from exit layer K alone")
    gen.add_argument("--alpha", type=float, default=0.1, help="ACD plausibility threshold (default 0.1)")
    gen.add_argument("--max-new-tokens", type=int, default=50)
    gen.add_argument("--do-sample", action="store_true")
    gen.add_argument("--temperature", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=50)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--num-beams", type=int, default=1)
    gen.add_argument("--seed", type=int)
    gen.set_defaults(func=run_generate)
    # Training commands forward their arguments to moduleformer_exit.training.<module>.main (their own --help).
    for name, module, text in TRAINING_COMMANDS:
        cmd = sub.add_parser(name, help=text, add_help=False)
        cmd.add_argument("args", nargs=argparse.REMAINDER)
        cmd.set_defaults(func=_training_command(module))
    search = sub.add_parser("search", add_help=False, help="architecture search on this device: Pareto front of "
                            "quality proxy, latency and memory ('search validate-proxy' ranks the proxies)")
    search.add_argument("args", nargs=argparse.REMAINDER)
    search.set_defaults(func=lambda args: _run_search(args.args))
    ev = sub.add_parser("eval", add_help=False, help="lm-eval 0.4 with the moduleformer-exit model type and the shipped "
                        "offline tasks (every lm-eval flag; e.g. --tasks austen --model_args pretrained=DIR)")
    ev.add_argument("args", nargs=argparse.REMAINDER)
    ev.set_defaults(func=_eval_command)
    return parser


def _run_search(argv: list[str]) -> int:
    """``moduleformer-exit search ...``: forwarded whole to ``moduleformer_exit.search.cli.main``."""
    from .search.cli import main as search_main

    return search_main(argv)


TRAINING_COMMANDS = (
    ("quickstart", "quickstart",
     "offline: train a tokenizer and a small ModuleFormer with exits on the bundled corpus (DeepSpeed), print "
     "perplexities, generate with and without ACD, save a loss curve"),
    ("pretrain", "pretrain", "DeepSpeed pretraining from a recipe (configs/recipes/*.json or a path)"),
    ("finetune", "finetune", "fine-tune a checkpoint with the HF Trainer (causal LM or classification; DeepSpeed, "
                             "LoRA optional)"),
    ("train-exits", "exits", "train exit heads on a frozen base; per-exit perplexity before and after"),
    ("usage", "expert_usage", "expert usage (counts, gate mass, contribution) on text files -> usage.json + heatmap"),
    ("prune", "expert_prune", "prune experts by a criterion and budget -> a smaller checkpoint + pruning.json"),
    ("extend", "extend", "add experts and train only them on new data (DeepSpeed), old experts frozen"),
)


def _training_command(module: str):
    """``func`` of a training subcommand: imports ``moduleformer_exit.training.<module>`` lazily (it needs the
    ``train`` extra) and calls its ``main`` with the remaining arguments."""
    def run(args: argparse.Namespace) -> int:
        import importlib

        try:
            mod = importlib.import_module(f"moduleformer_exit.training.{module}")
        except ImportError as e:
            raise SystemExit(f"{e}\nThe training commands need the train extra: pip install -e \".[train]\"")
        return mod.main(args.args)
    return run


def _eval_command(args: argparse.Namespace) -> int:
    """``func`` of ``eval``: lm-eval's CLI (needs the ``eval`` extra), see ``moduleformer_exit.evaluation.cli``."""
    from .evaluation.cli import main as eval_main

    return eval_main(args.args)


def main(argv: Optional[list[str]] = None) -> int:
    """Entry point of the ``moduleformer-exit`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    for name, module, _ in TRAINING_COMMANDS:  # forwarded whole (argparse.REMAINDER drops leading options)
        if argv and argv[0] == name:
            return _training_command(module)(argparse.Namespace(args=argv[1:]))
    if argv and argv[0] == "search":
        return _run_search(argv[1:])
    if argv and argv[0] == "eval":  # forwarded whole to lm-eval's CLI
        return _eval_command(argparse.Namespace(args=argv[1:]))
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
