"""``moduleformer-exit`` command line: ``bench``, ``generate``, ``search``, ``eval``; training: ``quickstart``,
``pretrain``, ``finetune``, ``train-exits``; experts: ``usage``, ``prune``, ``extend``."""
from __future__ import annotations

import argparse
import json
import platform
import sys
from typing import Optional, Sequence

import torch



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
    """Run the selected benchmark sections (one process, one run; see ``benchmarks/sections.py``) and print their
    tables. Process-wide settings (threads, flush-denormal, malloc thresholds) are restored afterwards."""
    from .benchmarks.sections import SECTIONS, section_names
    from .benchmarks.timing import process_settings

    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda needs a CUDA GPU (none is visible to torch)")
    sections = section_names(args.device) if args.only is None else tuple(args.only.split(","))
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        raise SystemExit(f"unknown bench section(s) {sorted(unknown)}; choose from {', '.join(SECTIONS)}")
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, threads={args.threads}, "
          f"fp32{' (quick sizes)' if args.quick else ''}")
    results: dict[str, list[dict]] = {}
    options = {"pruning_model": args.pruning_model, "pruning_run_dir": args.pruning_run_dir,
               "early_exit_model": args.early_exit_model, "early_exit_plot": args.early_exit_plot}
    with process_settings(threads=args.threads):
        for name in sections:
            section = SECTIONS[name]
            results[name] = section.run(args.quick, args.threads, options)
            if section.render is not None:
                section.render(results[name], _table)
            else:
                _table(section.title, section.table_columns(), results[name])
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(results, handle, indent=2)
    return 0


def _parse_contrast(text: str) -> tuple:
    parts = [p.strip() for p in text.replace(";", ",").split(",")]
    if len(parts) != 2:
        raise SystemExit(f"--contrast takes two layers 'UPPER,LOWER' (e.g. original,12), got {text!r}")
    try:
        return tuple(p if p.lower() == "original" else int(p) for p in parts)
    except ValueError:
        raise SystemExit(f"--contrast layers must be 'original' or layer numbers (e.g. original,12), got {text!r}")


def _check_model_dir(model_dir: str) -> None:
    """Name what is missing from a local checkpoint directory before transformers guesses at a Hub repo id."""
    import os

    if not os.path.isdir(model_dir):
        raise SystemExit(f"--model {model_dir}: no such directory (a local checkpoint directory with config.json, "
                         f"weights and tokenizer; everything runs offline)")
    if not os.path.isfile(os.path.join(model_dir, "config.json")):
        raise SystemExit(f"--model {model_dir}: no config.json there; point --model at a save_pretrained directory")
    if not any(os.path.isfile(os.path.join(model_dir, f)) for f in ("tokenizer.json", "tokenizer_config.json")):
        raise SystemExit(f"--model {model_dir}: no tokenizer (tokenizer.json) there; save the tokenizer with the "
                         f"model (tokenizer.save_pretrained(dir))")


def load_for_generation(model_dir: str, contrast: Optional[str] = None, exit_layer: Optional[int] = None,
                        alpha: float = 0.1):
    """Load a model for generation: a multi-exit model (ModuleFormer, GPT-2, GPT-Neo, Llama, T5) when an exit or
    contrast is asked for or the checkpoint has exit heads, otherwise a plain ``AutoModelForCausalLM`` (T5:
    ``AutoModelForSeq2SeqLM``)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM

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
        if config.model_type == "t5":  # MultiExitT5 without exits: generate() also with a decoder deeper than the
            return AutoMultiExitModel.from_pretrained(model_dir, MultiExitConfiguration()).eval()  # encoder
        plain = AutoModelForSeq2SeqLM if getattr(config, "is_encoder_decoder", False) else AutoModelForCausalLM
        return plain.from_pretrained(model_dir).eval()
    return AutoMultiExitModel.from_pretrained(model_dir, runtime).eval()


def run_generate(args: argparse.Namespace) -> int:
    """Generate from a prompt, streaming tokens to stdout as they are produced."""
    from transformers import AutoTokenizer, TextStreamer

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # no "Loading weights" bar before the streamed text
    _check_model_dir(args.model)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    inputs = tokenizer(args.prompt, return_tensors="pt")
    if inputs["input_ids"].shape[1] == 0:
        raise SystemExit("the prompt is empty (it encodes to no token): give some text to continue")
    if args.early_exit or args.self_speculative is not None:
        return run_generate_early_exit(args, tokenizer)
    try:
        model = load_for_generation(args.model, args.contrast, args.exit, args.alpha)
    except ValueError as error:  # an exit the model lacks, a bad contrast pair: the message names the fix
        raise SystemExit(f"error: {error}")
    if args.seed is not None:
        torch.manual_seed(args.seed)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    # generate() refuses a streamer with beam search: stream only where the method allows it
    streamer = TextStreamer(tokenizer, skip_special_tokens=True) if args.num_beams == 1 else None
    with torch.inference_mode():
        tokens = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=args.do_sample,
                                temperature=args.temperature if args.do_sample else None,
                                top_k=args.top_k if args.do_sample else None,
                                top_p=args.top_p if args.do_sample else None,
                                num_beams=args.num_beams, pad_token_id=pad_id, streamer=streamer)
    if streamer is None:
        print(tokenizer.decode(tokens[0], skip_special_tokens=True))
    return 0


def run_generate_early_exit(args: argparse.Namespace, tokenizer) -> int:
    """``generate --early-exit static|calm|free`` / ``--self-speculative K``: decode with
    :func:`~moduleformer_exit.early_exit.generate_early_exit`, print the text, then a summary line on stderr."""
    from . import AutoMultiExitModel
    from .early_exit import EarlyExitConfig, generate_early_exit

    if args.early_exit and args.self_speculative is not None:
        raise SystemExit("use either --early-exit or --self-speculative, not both")
    if args.contrast is not None or args.num_beams != 1:
        raise SystemExit("--early-exit / --self-speculative do not combine with --contrast or --num-beams")
    model = AutoMultiExitModel.from_pretrained(args.model).eval()
    num_layers = model.num_exit_layers
    try:
        if args.self_speculative is not None:
            config = EarlyExitConfig("self_speculative", exit_layer=args.self_speculative, gamma=args.gamma,
                                     do_sample=args.do_sample, temperature=args.temperature)
        else:
            exit_layer = None if args.early_exit == "calm" else args.exit
            if args.early_exit == "free" and exit_layer is None:
                exit_layer = num_layers // 2
            config = EarlyExitConfig(args.early_exit, exit_layer=exit_layer, threshold=args.threshold,
                                     min_layer=args.min_layer, adaptive_threshold=args.adaptive_threshold,
                                     decay_temperature=args.decay_temperature)
    except ValueError as error:
        raise SystemExit(f"bad early-exit option: {error}")
    inputs = tokenizer(args.prompt, return_tensors="pt")
    generator = torch.Generator().manual_seed(args.seed) if args.seed is not None else None
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out = generate_early_exit(model, inputs.input_ids, config, attention_mask=inputs.attention_mask,
                              max_new_tokens=args.max_new_tokens, pad_token_id=pad_id, generator=generator)
    print(tokenizer.decode(out.sequences[0], skip_special_tokens=True))
    stats = out.stats
    print(f"[{config.method}] mean exit layer {stats['mean_exit_layer']:.2f} of {num_layers}, layers/token "
          f"{stats['layers_per_token']:.2f}" + (f", acceptance {stats['acceptance_rate']:.1%}"
                                                 if stats["acceptance_rate"] is not None else ""), file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The ``moduleformer-exit`` argument parser."""
    parser = argparse.ArgumentParser(prog="moduleformer-exit", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    bench = sub.add_parser("bench", help="print benchmark tables (MoE layer, stick-breaking attention, decode, "
                                         "decode limit, ACD, training; peers / pruning / early-exit on request)")
    from .benchmarks.sections import SECTIONS

    bench.add_argument("--only", help=f"comma-separated subset of {','.join(SECTIONS)} (default: the CPU sections, "
                                      f"plus cuda_* with --device cuda)")
    bench.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    bench.add_argument("--quick", action="store_true", help="tiny sizes: checks the command runs, not speed")
    bench.add_argument("--json", help="also write the rows to this JSON file")
    bench.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                       help="cuda: also run the GPU kernel rows (Triton experts, stick-breaking, training step)")
    bench.add_argument("--pruning-model", help="pruning: trained ModuleFormer dir (default: train + cache a recipe)")
    bench.add_argument("--pruning-run-dir", help="pruning: run directory, reused when finished")
    bench.add_argument("--early-exit-model", default=None,
                       help="early-exit section: comma-separated trained multi-exit model directories (default: "
                            "runs/<name>/final of the recipes early-exit-8l, early-exit-8l-layerskip, "
                            "early-exit-neo-8l, trained there on first use)")
    bench.add_argument("--early-exit-plot", help="early-exit section: write the speed/quality PNG here")
    bench.set_defaults(func=run_bench)
    gen = sub.add_parser("generate", help="generate text (original head, one exit with --exit, or ACD with --contrast)")
    gen.add_argument("prompt")
    gen.add_argument("--model", required=True, help="checkpoint directory with config, weights and tokenizer")
    gen.add_argument("--contrast", help="ACD between two layers: UPPER,LOWER (e.g. original,12 or 24,12)")
    gen.add_argument("--exit", type=int, help="decode from exit layer K alone")
    gen.add_argument("--alpha", type=float, default=0.1, help="ACD plausibility threshold (default 0.1)")
    gen.add_argument("--max-new-tokens", type=int, default=50, help="tokens to generate (default 50)")
    gen.add_argument("--do-sample", action="store_true", help="sample instead of greedy / beam search (default off)")
    gen.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default 1.0)")
    gen.add_argument("--top-k", type=int, default=50, help="sampling: keep the k most likely tokens (default 50)")
    gen.add_argument("--top-p", type=float, default=1.0, help="sampling: nucleus probability (default 1.0: off)")
    gen.add_argument("--num-beams", type=int, default=1, help="beam search width (default 1: no beams; output is "
                                                             "printed at the end instead of streamed when > 1)")
    gen.add_argument("--seed", type=int, help="torch seed for sampling (default: unseeded)")
    gen.add_argument("--early-exit", choices=("static", "calm", "free"),
                     help="early-exit decoding (static needs --exit K; free uses --exit K as its shallow exit, "
                          "default L/2)")
    gen.add_argument("--threshold", type=float, default=0.9, help="CALM / FREE confidence threshold in [0, 1]")
    gen.add_argument("--min-layer", type=int, default=1, help="CALM: first layer allowed to exit")
    gen.add_argument("--decay-temperature", type=float, help="CALM: decaying threshold temperature")
    gen.add_argument("--adaptive-threshold", action="store_true", help="FREE: Beta-mixture adaptive threshold")
    gen.add_argument("--self-speculative", type=int, metavar="K",
                     help="lossless self-speculative decoding drafting with exit K (verify with the full model)")
    gen.add_argument("--gamma", type=int, default=4, help="self-speculative draft tokens per verify (default 4)")
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
