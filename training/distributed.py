"""Process environment of the training commands: offline by default, and the process-group set-up for DeepSpeed: environment defaults for a single process, a rendezvous that fails
fast (naming the environment variables) when the other ranks never come, and a clean teardown.

A ``RANK=0 WORLD_SIZE=2`` left in the shell would otherwise make a single-process run wait silently for the
default 30-minute process-group timeout. Without a launcher that hosts the store (torchrun), rank 0 opens the
TCP store itself and waits at most ``MODULEFORMER_EXIT_RENDEZVOUS_TIMEOUT`` seconds (default 120) for the others;
collectives afterwards keep the long default timeout.
"""
from __future__ import annotations

import datetime
import os
import socket

import torch

RENDEZVOUS_TIMEOUT_ENV = "MODULEFORMER_EXIT_RENDEZVOUS_TIMEOUT"
DIST_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


_ADDED_ENV: list[str] = []  # variables ensure_dist_env set, removed again by shutdown_distributed
_STORE = None  # our rendezvous store (its server socket is released on shutdown)


class RendezvousError(RuntimeError):
    """The other processes of a multi-process run did not join in time."""


def offline_by_default() -> None:
    """Local files only unless the caller set these variables (``datasets`` otherwise contacts the Hub, e.g. its
    download counter, even for local text files)."""
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ.setdefault(var, "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ensure_dist_env() -> None:
    """Default RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT for a single process without a launcher
    (removed again by :func:`shutdown_distributed`, so a later run in the same process gets a fresh port)."""
    before = set(os.environ)
    try:
        _ensure_dist_env()
    finally:
        _ADDED_ENV.extend(k for k in (*DIST_VARS, "DS_ACCELERATOR") if k in os.environ and k not in before)


def _ensure_dist_env() -> None:
    # validate before setting anything: a failed call must leave the environment as it found it (a leaked
    # LOCAL_RANK makes accelerate start a process group in the next run of the same process)
    if "RANK" in os.environ and "MASTER_PORT" not in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise RendezvousError(_stale_env_hint("MASTER_PORT is not set"))
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(_free_port()))
    os.environ.setdefault("DS_ACCELERATOR", "cpu" if not torch.cuda.is_available() else "cuda")


def _stale_env_hint(what: str) -> str:
    env = " ".join(f"{k}={os.environ[k]}" for k in DIST_VARS if k in os.environ)
    return (f"{what} ({env}). For a single-process run, unset RANK and WORLD_SIZE (e.g. `env -u RANK -u WORLD_SIZE "
            f"moduleformer-exit pretrain ...`); for several processes start every rank with torchrun or deepspeed.")


def _rendezvous(backend: str) -> None:
    """Init ``torch.distributed`` through a TCP store whose wait for the other ranks times out quickly."""
    import torch.distributed as tdist

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    timeout = float(os.environ.get(RENDEZVOUS_TIMEOUT_ENV, "120"))
    try:
        store = tdist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, rank == 0,
                               timeout=datetime.timedelta(seconds=timeout), wait_for_workers=True)
    except (RuntimeError, OSError) as e:  # torch raises DistStoreError (a RuntimeError) on timeout
        raise RendezvousError(_stale_env_hint(
            f"Rank {rank} of WORLD_SIZE={world} waited {timeout:g} s for the other processes and gave up "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})")) from None
    global _STORE
    _STORE = store
    store.set_timeout(datetime.timedelta(minutes=30))  # collectives and later store reads: the usual long timeout
    tdist.init_process_group(backend, store=store, rank=rank, world_size=world)


def init_deepspeed_distributed():
    """Import DeepSpeed, skip the shm comm op on CPU (a ~50 s JIT build), init the process group; returns the
    ``deepspeed`` module."""
    ensure_dist_env()
    import deepspeed
    import torch.distributed as tdist

    if not torch.cuda.is_available():
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    # torchrun's agent hosts the store itself (workers connect as clients): let DeepSpeed use env://
    if not tdist.is_initialized() and not os.environ.get("TORCHELASTIC_RUN_ID"):
        _rendezvous(backend)
    import deepspeed.comm as dist

    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend=backend)
    return deepspeed


def shutdown_distributed() -> None:
    """Barrier, then tear the process group down: a rank that exits while others still write (rank 0 saving the
    tokenizer, say) would otherwise abort in gloo's background threads ("terminate called without an active
    exception")."""
    import torch.distributed as dist

    global _STORE
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
        _forget_deepspeed_groups()
    _STORE = None
    while _ADDED_ENV:
        os.environ.pop(_ADDED_ENV.pop(), None)


def _forget_deepspeed_groups() -> None:
    """Drop the process groups DeepSpeed caches at module level (its clone of the world group, the expert and
    expert-data-parallel groups): they die with the process group, and a second run in the same process (a notebook,
    a test) would otherwise broadcast over a destroyed group ("Group ... is not registered"). DeepSpeed has no public
    reset, so this names its module globals; a release without them is left alone."""
    import sys

    groups = sys.modules.get("deepspeed.utils.groups")
    if groups is None:
        return
    for name in ("_WORLD_GROUP", "_ZERO_PARAM_INTRA_PARALLEL_GROUP"):
        if hasattr(groups, name):
            setattr(groups, name, None)
    for name in ("_EXPERT_PARALLEL_GROUP", "_EXPERT_PARALLEL_GROUP_RANKS", "_EXPERT_DATA_PARALLEL_GROUP",
                 "_EXPERT_DATA_PARALLEL_GROUP_RANKS", "_ALL_TO_ALL_GROUP"):
        if isinstance(getattr(groups, name, None), dict):
            getattr(groups, name).clear()
