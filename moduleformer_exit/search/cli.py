"""``moduleformer-exit search`` (the Pareto search) and ``moduleformer-exit search validate-proxy`` (the proxy's
rank correlation with trained perplexity): argument parsing and wiring only."""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from dataclasses import asdict
from typing import Optional, Sequence

from .evolution import EvolutionSettings, MeasurementCache, evolution_search
from .objectives import DEFAULT_PROXY, PROXIES, Constraints, evaluate, objective_names
from .space import SearchSpaceError, load_space


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="moduleformer-exit search",
        description="Pareto search of ModuleFormer architectures on this device (quality proxy vs decode latency vs "
                    "peak memory); 'moduleformer-exit search validate-proxy --help' ranks the proxies.")
    p.add_argument("--out", required=True, help="output directory (pareto.json, configs/, evaluated.csv, "
                                                "pareto.png, cache.jsonl); rerun with the same --out to resume")
    p.add_argument("--candidates", type=int, default=50, help="architectures to evaluate (default 50)")
    p.add_argument("--space", help="search-space JSON (default: the bundled default_space.json)")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N] (measurements run there)")
    p.add_argument("--proxy", choices=PROXIES, default=DEFAULT_PROXY,
                   help=f"quality proxy maximised by the search (default {DEFAULT_PROXY}, see validate-proxy)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--init", type=int, default=10, help="random architectures of iteration 0 (archai: 10)")
    p.add_argument("--iterations", type=int, default=None, help="stop after this many iterations (default: budget)")
    p.add_argument("--mutation-prob", type=float, default=0.3)
    p.add_argument("--crossovers", type=int, default=5)
    p.add_argument("--random-mix", type=int, default=5)
    p.add_argument("--prompt-len", type=int, default=16, help="prompt tokens for prefill (default 16)")
    p.add_argument("--new-tokens", type=int, default=8, help="decoded tokens per timing round (default 8)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3, help="timed rounds; the median is kept (default 3)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--max-latency-ms", type=float, help="constraint: decode ms per token")
    p.add_argument("--max-memory-mb", type=float, help="constraint: peak memory in MiB")
    p.add_argument("--max-params", type=int, help="constraint: total parameters")
    p.add_argument("--exits", action="store_true",
                   help="search the exit layer too: measure decode latency at every exit layer, add the exit's proxy "
                        "and latency as objectives")
    p.add_argument("--pruning", action="store_true",
                   help="search the fraction of experts kept after pruning too (the pruned model is measured)")
    p.add_argument("--no-progress", action="store_true")
    return p


def run_search(args: argparse.Namespace) -> int:
    from .measure import MeasureSettings, measure_config
    from .report import write_outputs

    try:
        space = load_space(args.space, include_exits=args.exits, include_pruning=args.pruning)
    except (SearchSpaceError, OSError) as error:
        print(f"error: invalid search space: {error}", file=sys.stderr)
        return 2
    try:
        settings = MeasureSettings(device=args.device, prompt_len=args.prompt_len, new_tokens=args.new_tokens,
                                   warmup=args.warmup, repeats=args.repeats, threads=args.threads, seed=args.seed)
        evolution = EvolutionSettings(candidates=args.candidates, init_num_models=args.init,
                                      max_iterations=args.iterations, mutation_prob=args.mutation_prob,
                                      num_crossovers=args.crossovers, num_random_mix=args.random_mix, seed=args.seed)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    constraints = Constraints(args.max_latency_ms, args.max_memory_mb, args.max_params)
    os.makedirs(args.out, exist_ok=True)
    # The cache is valid for one device / measurement setting / space (fixed fields change the model) only.
    key_text = json.dumps({"measure": asdict(settings), "fixed": space.fixed, "exits": args.exits,
                           "pruning": args.pruning}, sort_keys=True)
    cache = MeasurementCache(os.path.join(args.out, "cache.jsonl"), hashlib.sha1(key_text.encode()).hexdigest()[:16])
    names, higher = objective_names(space, args.proxy)

    def measure(config, exits):
        return measure_config(config, settings, exits=exits)

    start = time.time()
    rows, front = evolution_search(space, lambda arch, cached: evaluate(arch, space, constraints, measure, cached),
                                   names, higher, evolution, cache, progress=not args.no_progress)
    seconds = time.time() - start
    meta = {"device": args.device, "proxy": args.proxy, "seed": args.seed, "seconds": round(seconds, 1),
            "cache_hits": cache.hits, "measure": asdict(settings), "constraints": asdict(constraints),
            "space": space.to_json()}
    paths = write_outputs(args.out, space, rows, front, names, higher, meta)
    print(f"evaluated {len(rows)} architectures in {seconds:.1f} s ({cache.hits} from the cache); "
          f"front of {len(front)}: {paths['pareto']}")
    for i in sorted(front, key=lambda i: rows[i]["decode_ms"]):
        row = rows[i]
        print(f"  {row['id']}  {args.proxy}={row[args.proxy]:,}  decode={row['decode_ms']:.2f} ms/token  "
              f"memory={row['peak_memory_mb']:.1f} MiB  -> configs/{row['id']}.json")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry of ``moduleformer-exit search ...``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "validate-proxy":
        from .validate import main as validate_main

        return validate_main(argv[1:])
    return run_search(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
