"""Checkpoint I/O of a pretraining run: crash-safe saves, a validated ``latest`` pointer, and resume that never
unpickles code.

Layout: ``checkpoints/step_<N>/`` (DeepSpeed's files, ``rng_rank<r>.pt``, ``experts_ep<r>.safetensors`` with
expert parallelism (``expert_parallel.py``), ``run.json``: the recipe and data
fingerprint the checkpoint was trained with) and ``checkpoints/latest`` naming the last COMPLETE one.

A save never touches what ``latest`` names until the new checkpoint is whole:

1. DeepSpeed writes into a staging tag ``step_<N>.tmp`` (``save_latest=False``; DeepSpeed's own ``latest`` is a
   plain unsynced write) together with the RNG states and ``run.json``; every file is fsynced; barrier.
2. Rank 0 swaps it in: an existing ``step_<N>`` (a ``--no-resume`` restart re-saving a step, maybe the one
   ``latest`` names) is renamed to ``step_<N>.old``, the staging dir to ``step_<N>``, then ``.old`` is deleted.
3. Rank 0 replaces ``latest`` atomically (write ``latest.tmp``, fsync, ``os.replace``), then prunes old tags.

:func:`recover` (run before every resume) undoes a kill between the two renames of step 2 (``.old`` back in place)
and drops unfinished staging dirs, so a kill at any point leaves ``latest`` naming a complete checkpoint.

Trust: ``latest`` must hold a plain ``step_<N>`` name inside ``checkpoints/`` (no path). DeepSpeed's files are
loaded with ``torch.load(weights_only=True)`` and an allow-list of the few DeepSpeed types they hold, so a pickle
planted in a run directory cannot run code; a file holding any other type is refused.
"""
from __future__ import annotations

import os
import random
import re
import shutil
from typing import Optional

import torch

from .expert_parallel import expert_load_fn, is_expert_parallel, save_expert_shard

POINTER = "latest"
STAGING, OLD = ".tmp", ".old"
TAG_RE = re.compile(r"step_([0-9]+)")


class CheckpointError(RuntimeError):
    """A run directory's checkpoints are unusable; the message names the file and the fix."""


# ----------------------------------------------------------------------------------------------- pointer + tags
def tag_for(step: int) -> str:
    return f"step_{step}"


def tag_step(name: str) -> Optional[int]:
    """N for a plain ``step_<N>`` name, else None."""
    m = TAG_RE.fullmatch(name)
    return int(m.group(1)) if m else None


def _fsync_path(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def fsync_tree(path: str) -> None:
    """fsync every file below ``path`` and the directories themselves."""
    for root, _, names in os.walk(path):
        for n in names:
            _fsync_path(os.path.join(root, n))
        _fsync_path(root)


def write_pointer_atomically(ckpt_dir: str, tag: str) -> None:
    """Replace ``ckpt_dir/latest`` with ``tag`` atomically (tmp file, fsync, rename, fsync dir)."""
    tmp = os.path.join(ckpt_dir, POINTER + STAGING)
    with open(tmp, "w") as f:
        f.write(tag)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(ckpt_dir, POINTER))
    _fsync_path(ckpt_dir)


def read_pointer(ckpt_dir: str) -> Optional[str]:
    """The tag ``latest`` names (validated: a plain ``step_<N>`` whose directory exists), or None without a pointer.

    Raises:
        CheckpointError: ``latest`` holds anything but a plain tag name, or names a missing directory.
    """
    path = os.path.join(ckpt_dir, POINTER)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8", errors="replace") as f:
        tag = f.read().strip()
    if tag_step(tag) is None:
        raise CheckpointError(
            f"{path} holds {tag[:80]!r}, not a checkpoint name: only a plain step_<N> inside {ckpt_dir} is accepted "
            f"(no paths). Write the name of a complete checkpoint there, or start afresh with --no-resume.")
    tag_dir = os.path.join(ckpt_dir, tag)
    if not os.path.isdir(tag_dir):
        raise CheckpointError(
            f"{path} names {tag}, but {tag_dir} does not exist (deleted?). Point {path} at a complete checkpoint "
            f"({', '.join(list_tags(ckpt_dir)) or 'none left'}) or start afresh with --no-resume.")
    return tag


def list_tags(ckpt_dir: str) -> list[str]:
    """Complete-looking ``step_<N>`` directories, oldest first."""
    if not os.path.isdir(ckpt_dir):
        return []
    tags = [d for d in os.listdir(ckpt_dir) if tag_step(d) is not None and os.path.isdir(os.path.join(ckpt_dir, d))]
    return sorted(tags, key=tag_step)


def recover(ckpt_dir: str) -> None:
    """Finish or undo what a killed save left (rank 0 only): restore ``step_<N>.old`` where ``step_<N>`` is gone,
    delete stale ``.old`` copies and unfinished ``.tmp`` staging dirs."""
    if not os.path.isdir(ckpt_dir):
        return
    for name in os.listdir(ckpt_dir):
        path = os.path.join(ckpt_dir, name)
        if name.endswith(OLD) and tag_step(name[:-len(OLD)]) is not None:
            target = path[:-len(OLD)]
            if os.path.isdir(target):
                shutil.rmtree(path)
            else:
                os.rename(path, target)
    for name in os.listdir(ckpt_dir):
        if name.endswith(STAGING) and tag_step(name[:-len(STAGING)]) is not None:
            shutil.rmtree(os.path.join(ckpt_dir, name), ignore_errors=True)
    _fsync_path(ckpt_dir)


def replace_dir(staging: str, target: str) -> None:
    """Move the complete ``staging`` dir to ``target``, keeping any existing ``target`` as ``target.old`` until the
    new one is in place (see :func:`recover` for a kill in between)."""
    old = target + OLD
    if os.path.isdir(old):
        shutil.rmtree(old)
    if os.path.isdir(target):
        os.rename(target, old)
    os.rename(staging, target)
    _fsync_path(os.path.dirname(target))
    if os.path.isdir(old):
        shutil.rmtree(old)


# ----------------------------------------------------------------------------------------------- RNG state
def rng_state() -> dict:
    """Every RNG the run draws from, as tensors and plain Python values (loadable with ``weights_only=True``)."""
    import numpy as np

    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: dict) -> None:
    """Restore what :func:`rng_state` captured."""
    import numpy as np

    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    npy = state["numpy"]
    np.random.set_state((npy["kind"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"],
                         npy["cached_gaussian"]))
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------------------------- save
def write_staging(engine, ckpt_dir: str, tag: str, client_state: dict, run_info_json: str, rank: int) -> str:
    """Every rank writes its share of ``tag.tmp`` (DeepSpeed files + RNG); rank 0 adds ``run.json``."""
    staging = tag + STAGING
    engine.save_checkpoint(ckpt_dir, tag=staging, client_state=client_state, save_latest=False)
    staging_dir = os.path.join(ckpt_dir, staging)
    save_expert_shard(getattr(engine, "module", None), staging_dir)  # EP: this rank's experts (DeepSpeed: rank 0's)
    torch.save(rng_state(), os.path.join(staging_dir, f"rng_rank{rank}.pt"))
    if rank == 0:
        with open(os.path.join(staging_dir, "run.json"), "w", encoding="utf-8") as f:
            f.write(run_info_json)
    fsync_tree(staging_dir)
    return staging_dir


def prune(ckpt_dir: str, tag: str, keep: int) -> None:
    """Delete tags older than the newest ``keep`` (``tag`` included) and any newer than ``tag`` (a previous run's,
    superseded by this one: ``latest`` no longer names them)."""
    step = tag_step(tag)
    tags = [d for d in list_tags(ckpt_dir) if d != tag]
    older = [d for d in tags if tag_step(d) < step]
    for old in older[:max(0, len(older) - (keep - 1))]:
        shutil.rmtree(os.path.join(ckpt_dir, old), ignore_errors=True)
    for newer in (d for d in tags if tag_step(d) > step):
        shutil.rmtree(os.path.join(ckpt_dir, newer), ignore_errors=True)


def save_checkpoint(engine, ckpt_dir: str, step: int, position: int, keep: int, dist, run_info_json: str) -> str:
    """Write ``step_<N>`` crash-safely (see the module docstring) on every rank; returns the tag."""
    rank = dist.get_rank()
    tag = tag_for(step)
    if rank == 0:
        os.makedirs(ckpt_dir, exist_ok=True)
        stale = os.path.join(ckpt_dir, tag + STAGING)  # an interrupted save of the same step: never named by latest
        if os.path.isdir(stale):
            shutil.rmtree(stale)
    dist.barrier()
    try:
        staging_dir = write_staging(engine, ckpt_dir, tag, {"step": step, "position": position}, run_info_json, rank)
    except (OSError, RuntimeError) as e:  # a full disk shows up as torch's "unexpected pos ..." RuntimeError
        free = shutil.disk_usage(ckpt_dir).free / 2 ** 20
        raise CheckpointError(f"Writing checkpoint {os.path.join(ckpt_dir, tag + STAGING)} failed: {e}. {free:.0f} MiB "
                              f"free on that disk: free space (or lower training.keep_checkpoints) and rerun to "
                              f"resume from {os.path.join(ckpt_dir, POINTER)}.") from e
    dist.barrier()
    if rank == 0:
        replace_dir(staging_dir, os.path.join(ckpt_dir, tag))
        write_pointer_atomically(ckpt_dir, tag)
        prune(ckpt_dir, tag, keep)
    dist.barrier()
    return tag


# ----------------------------------------------------------------------------------------------- safe load
def _deepspeed_safe_globals() -> list:
    """The non-tensor types DeepSpeed 0.19's checkpoint files hold (ZeRO 1-3 optimizer states)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [fragment_address, LossScaler, DynamicLossScaler, ZeroStageEnum]


def safe_torch_load(path: str, map_location=None):
    """``torch.load(weights_only=True)`` with DeepSpeed's allow-listed types; a file with any other type (a planted
    pickle) raises :class:`CheckpointError` naming the file, without running it."""
    import pickle

    with torch.serialization.safe_globals(_deepspeed_safe_globals()):
        try:
            return torch.load(path, map_location=map_location, weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError, AttributeError) as e:
            raise CheckpointError(
                f"Refusing to load {path}: it is not a plain checkpoint written by this trainer "
                f"({type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else 'empty or truncated file'}). "
                f"Checkpoints are loaded weights-only; remove this checkpoint or start afresh with --no-resume."
            ) from None


def install_safe_loader(engine) -> None:
    """Make DeepSpeed read its checkpoint files through :func:`safe_torch_load` (its default engine unpickles with
    ``weights_only=False``)."""
    from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine

    class WeightsOnlyCheckpointEngine(TorchCheckpointEngine):
        def load(self, path: str, map_location=None):
            return safe_torch_load(path, map_location)

    current = getattr(engine, "checkpoint_engine", None)
    if current is not None and type(current) is not TorchCheckpointEngine:
        raise CheckpointError(f"Unsupported DeepSpeed checkpoint engine {type(current).__name__}: resume loads "
                              f"weights-only through the default TorchCheckpointEngine only.")
    engine.checkpoint_engine = WeightsOnlyCheckpointEngine(engine._config)


def load_checkpoint(engine, ckpt_dir: str, tag: str, rank: int) -> dict:
    """Load ``tag`` into the engine (weights-only) and restore this rank's RNG; returns the client state
    (``step``, ``position``)."""
    install_safe_loader(engine)
    tag_dir = os.path.join(ckpt_dir, tag)
    module = getattr(engine, "module", None)
    # expert parallelism: each rank's own experts (ep_size 1: DeepSpeed's plain load, as before)
    extra = {"custom_load_fn": expert_load_fn(tag_dir)} if module is not None and is_expert_parallel(module) else {}
    load_path, client = engine.load_checkpoint(ckpt_dir, tag=tag, **extra)
    if load_path is None:
        raise CheckpointError(f"DeepSpeed could not load {tag_dir} (files missing?). Remove it and point "
                              f"{os.path.join(ckpt_dir, POINTER)} at another checkpoint, or use --no-resume.")
    rng_path = os.path.join(tag_dir, f"rng_rank{rank}.pt")
    if not os.path.isfile(rng_path):
        raise CheckpointError(f"{rng_path} is missing: the checkpoint cannot resume this rank exactly.")
    set_rng_state(safe_torch_load(rng_path))
    return client
