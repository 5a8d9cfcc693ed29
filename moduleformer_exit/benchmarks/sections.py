"""The ``moduleformer-exit bench`` sections in one table: name -> title, columns and how to run it (full or quick
sizes). The CLI only looks sections up here; each runner imports its benchmark lazily (``training`` needs the
``train`` extra, the ``cuda_*`` sections a GPU)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Union

Columns = Sequence[tuple[str, str]]


@dataclass(frozen=True)
class Section:
    """One benchmark table: ``run(quick, threads, options) -> rows`` (list of dicts; ``options`` holds section
    options from the command line, e.g. ``pruning_model``); ``columns`` are (key, format) pairs or a callable
    returning them (when the benchmark module defines them); ``device`` is ``"cpu"`` or ``"cuda"``; ``on_request``
    sections (long reports that train models, peer comparisons) run only when named with ``--only``; ``render``
    prints a section whose rows need more than one table."""

    title: str
    columns: Union[Columns, Callable[[], Columns]]
    run: Callable[..., list[dict]]
    device: str = "cpu"
    on_request: bool = False
    render: Optional[Callable[[list[dict], Callable], None]] = None

    def table_columns(self) -> Columns:
        return self.columns() if callable(self.columns) else self.columns


def _moe(quick: bool, threads: int, options: Optional[dict] = None) -> list[dict]:
    from .moe import bench_moe_mlp

    shapes = ((256, 64, 64, 8, 2),) if quick else ((4096, 1024, 1024, 32, 2), (4096, 1024, 256, 64, 4))
    return bench_moe_mlp(shapes=shapes, threads=threads, naive=True, **({"repeats": 2} if quick else {}))


def _attention(quick: bool, threads: int, options: Optional[dict] = None) -> list[dict]:
    from .attention import bench_stick_breaking

    seq_lens = (64, 128) if quick else (512, 1024, 2048)
    return [{"setting": setting, **row}
            for skip, setting in ((True, "underflow skip (default)"), (False, "full walk (worst case)"))
            for row in bench_stick_breaking(seq_lens=seq_lens, threads=threads, skip_underflow=skip,
                                            **({"repeats": 2} if quick else {}))]


def _tiny_config():
    from ..configuration import ModuleFormerConfig, bundled_config_path

    return ModuleFormerConfig.from_json_file(bundled_config_path("moduleformer-tiny"))


def _decode(quick: bool, threads: int, options: Optional[dict] = None) -> list[dict]:
    from .decode import bench_decode

    if quick:
        return bench_decode(batch_sizes=(1, 2), prompt_len=4, new_tokens=4, config=_tiny_config(), threads=threads,
                            repeats=1)
    return bench_decode(threads=threads)


def _decode_limit(quick: bool, threads: int, options: Optional[dict] = None) -> list[dict]:
    from .decode_limit import bench_decode_limit

    if quick:
        return bench_decode_limit(config=_tiny_config(), batch_sizes=(1,), prompt_len=4, new_tokens=3,
                                  threads=threads, repeats=1)
    return bench_decode_limit(threads=threads)


def _decode_limit_columns() -> Columns:
    from .decode_limit import DECODE_LIMIT_COLUMNS

    return DECODE_LIMIT_COLUMNS


def _peers(quick: bool, threads: int, options: Optional[dict] = None) -> list[dict]:
    from .peers import bench_peers

    return bench_peers(threads=threads, quick=quick)


def _peers_columns() -> Columns:
    from .peers import PEERS_COLUMNS

    return PEERS_COLUMNS


def _pruning(quick: bool, threads: int, options: Optional[dict] = None) -> list[dict]:
    from .pruning import bench_pruning

    options = options or {}
    run_dir = options.get("pruning_run_dir") or ("runs/bench-pruning-quick" if quick else "runs/bench-pruning")
    report = bench_pruning(run_dir, options.get("pruning_model"), quick, threads=threads)
    return [{**report, "run_dir": run_dir}]


def _render_pruning(rows: list[dict], table: Callable) -> None:
    from .pruning import render_pruning_report

    render_pruning_report(rows[0], table)


def _acd(quick: bool, threads: int, options: Optional[dict] = None) -> list[dict]:
    from .decode import bench_acd_decode

    if quick:
        return bench_acd_decode(prompt_len=4, new_tokens=4, config=_tiny_config(), threads=threads, repeats=1)
    return bench_acd_decode(threads=threads)


def _training(quick: bool, threads: int, options: Optional[dict] = None) -> list[dict]:
    try:
        from .training import bench_training
    except ImportError as error:  # the train extra is optional
        raise SystemExit(f"bench training needs the train extra (pip install -e '.[train]'): {error}")
    if quick:
        return bench_training(stages=(0,), steps=2, warmup=1, batch_size=4, seq_len=32)
    return bench_training(threads=threads)


def _early_exit(quick: bool, threads: int, options: Optional[dict] = None) -> list[dict]:
    from types import SimpleNamespace

    from .early_exit import DEFAULT_MODEL, run_early_exit_bench

    options = options or {}
    args = SimpleNamespace(quick=quick, early_exit_model=options.get("early_exit_model") or DEFAULT_MODEL,
                           early_exit_plot=options.get("early_exit_plot"))
    return run_early_exit_bench(args)


def _render_early_exit(rows: list[dict], table: Callable) -> None:
    from .early_exit import render_early_exit

    render_early_exit(rows, table)


def _expert_parallel(quick: bool, threads: int, options: Optional[dict] = None) -> list[dict]:
    try:
        from .expert_parallel import run_section
    except ImportError as error:  # the train extra is optional
        raise SystemExit(f"bench expert-parallel needs the train extra (pip install -e '.[train]'): {error}")
    return run_section(quick, threads)


def _render_expert_parallel(rows: list[dict], table: Callable) -> None:
    from .expert_parallel import render_expert_parallel

    render_expert_parallel(rows, table)


def _cuda_experts(quick: bool, threads: int, options: Optional[dict] = None) -> list[dict]:
    from .kernels_cuda import bench_expert_kernels_cuda

    return bench_expert_kernels_cuda()


def _cuda_expert_columns() -> Columns:
    from .kernels_cuda import TABLE_COLUMNS

    return TABLE_COLUMNS


def _cuda_attention(quick: bool, threads: int, options: Optional[dict] = None) -> list[dict]:
    from .attention_cuda import bench_stick_breaking_cuda

    return bench_stick_breaking_cuda()


def _cuda_training(quick: bool, threads: int, options: Optional[dict] = None) -> list[dict]:
    from .model_cuda import bench_training_step_cuda

    return [row for backend in ("triton", "torch") for row in bench_training_step_cuda(backend=backend)]


SECTIONS: dict[str, Section] = {
    "moe": Section(
        "MoE MLP layer vs dense GEMM pair of equal active FLOPs (efficiency = dense / MoE; naive = IBM-style Python "
        "loop over experts)",
        [("N", "d"), ("d", "d"), ("h", "d"), ("E", "d"), ("k", "d"), ("fwd_moe_ms", ".1f"), ("fwd_dense_ms", ".1f"),
         ("fwd_eff", ".2f"), ("fwdbwd_moe_ms", ".1f"), ("fwdbwd_dense_ms", ".1f"), ("fwdbwd_eff", ".2f"),
         ("layer_fwd_eff", ".2f"), ("layer_fwdbwd_eff", ".2f"),
         ("naive_fwd_ms", ".1f"), ("naive_fwdbwd_ms", ".1f")], _moe),
    "attention": Section(
        "Stick-breaking attention fwd vs SDPA(is_causal) (B=1, 16 query heads, head_dim 64, N(0,1) inputs)",
        [("setting", ""), ("T", "d"), ("sb_ms", ".1f"), ("sdpa_ms", ".1f"), ("ratio", ".2f"), ("sb_peak_mb", ".1f"),
         ("sdpa_peak_mb", ".1f")], _attention),
    "decode": Section(
        "Greedy decode with KV cache (HF generate)",
        [("batch", "d"), ("prompt_len", "d"), ("new_tokens", "d"), ("seconds", ".2f"), ("tokens_per_s", ".1f"),
         ("active_params", ",d")], _decode),
    "decode_limit": Section(
        "Decode step vs the memory-bandwidth limit (a chain of GEMVs over the same active weights; of_limit = limit "
        "/ step)", _decode_limit_columns, _decode_limit),
    "acd": Section(
        "ACD greedy decode vs plain greedy, same model (batch 1; overhead = time / plain - 1)",
        [("mode", ""), ("batch", "d"), ("new_tokens", "d"), ("seconds", ".2f"), ("tokens_per_s", ".1f"),
         ("overhead", "+.1%")], _acd),
    "training": Section(
        "Training step: DeepSpeed ZeRO stages vs a plain PyTorch loop, same model and batch (1 process)",
        [("mode", ""), ("stage", ""), ("step_ms", ".1f"), ("tokens_per_s", ",.0f"), ("overhead_pct", "+.1f"),
         ("peak_rss_mb", ".0f"), ("peak_delta_mb", ".0f")], _training),
    "peers": Section(
        "ModuleFormer vs transformers' JetMoE, matched shapes and active parameters (fp32; ratio = our throughput / "
        "JetMoE's, fastest of interleaved runs)", _peers_columns, _peers, on_request=True),
    "pruning": Section(
        "Expert pruning / specialisation / extension report (trains and caches its models; --pruning-model, "
        "--pruning-run-dir)", [], _pruning, on_request=True, render=_render_pruning),
    "early-exit": Section(
        "Early-exit decoding vs full-depth greedy on trained multi-exit models (--early-exit-model, "
        "--early-exit-plot)", [], _early_exit, on_request=True, render=_render_early_exit),
    "expert-parallel": Section(
        "Expert parallelism: EP=1 vs EP=2 on 2 processes (tokens/s, peak RSS per rank) + MoLM-350M-4B memory model",
        [], _expert_parallel, on_request=True, render=_render_expert_parallel),
    "cuda_experts": Section("GPU routed expert MLP vs dense GEMM pair of equal active FLOPs (bf16; eff = dense / "
                            "path)", _cuda_expert_columns, _cuda_experts, device="cuda"),
    "cuda_attention": Section(
        "GPU stick-breaking (Triton) vs SDPA(is_causal), bf16, head_dim 64",
        [("T", "d"), ("B", "d"), ("sb_fwd_ms", ".3f"), ("sdpa_fwd_ms", ".3f"), ("ratio_fwd", ".2f"),
         ("sb_fwdbwd_ms", ".3f"), ("sdpa_fwdbwd_ms", ".3f"), ("ratio_fwdbwd", ".2f"), ("sb_fwdbwd_peak_mb", ".0f"),
         ("sdpa_fwdbwd_peak_mb", ".0f")], _cuda_attention, device="cuda"),
    "cuda_training": Section(
        "GPU training step, ~350M-active ModuleFormer (bf16, fused AdamW)",
        [("backend", ""), ("batch", "d"), ("seq_len", "d"), ("step_ms", ".1f"), ("tokens_per_s", ",.0f"),
         ("tflops", ".1f"), ("mfu", ".1%"), ("host_syncs", "d")], _cuda_training, device="cuda"),
}


def section_names(device: str = "cpu") -> tuple[str, ...]:
    """The sections a plain ``bench`` runs on ``device`` (``"cpu"``; ``"cuda"`` adds the GPU ones), in table order;
    ``on_request`` sections run only when named with ``--only``."""
    return tuple(n for n, s in SECTIONS.items() if not s.on_request and (s.device == "cpu" or device == "cuda"))
