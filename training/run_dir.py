"""A run directory's own records: the recipe and data fingerprint each checkpoint was trained with, the check that a
resumed run still matches them, and atomic writes of ``recipe.json`` and ``tokenizer/``.

On resume the new recipe is compared with the one stored in the checkpoint (``run.json``): only the keys in
:data:`SAFE_CHANGES` (how long to train and how often to log, evaluate and save) may differ; anything else (lr,
block size, widths, data, vocabulary, seeds, DeepSpeed settings) is refused with the list of differences, as is a
changed data file or tokenizer. ``--no-resume`` starts afresh (new tokenizer, new recipe) instead.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from typing import Any, Optional

from .checkpoint import OLD, STAGING, replace_dir

RUN_INFO = "run.json"
SAFE_CHANGES = frozenset({"name", "training.max_steps", "training.log_interval", "training.eval_interval",
                          "training.save_interval", "training.keep_checkpoints", "training.eval_batch_size"})
_PARTIAL_HASH_BYTES = 1 << 20  # fingerprint: size + SHA-256 of the first and last MiB (cheap on large corpora)


class RunMismatchError(ValueError):
    """A resumed run's recipe, data or tokenizer differs from what its checkpoint was trained with."""


def file_fingerprint(path: str) -> dict:
    """``{"size", "sha256"}`` of a file (whole file up to 2 MiB, else its first and last MiB)."""
    size = os.path.getsize(path)
    h = hashlib.sha256()
    with open(path, "rb") as f:
        if size <= 2 * _PARTIAL_HASH_BYTES:
            h.update(f.read())
        else:
            h.update(f.read(_PARTIAL_HASH_BYTES))
            f.seek(size - _PARTIAL_HASH_BYTES)
            h.update(f.read())
    return {"size": size, "sha256": h.hexdigest()}


def run_info(recipe: dict, data_files: list[str], tokenizer_dir: Optional[str]) -> dict:
    """What a checkpoint records about how it was trained: the recipe, the data files' fingerprints (by basename
    order as given) and the tokenizer's."""
    tok = os.path.join(tokenizer_dir, "tokenizer.json") if tokenizer_dir else None
    return {"recipe": recipe,
            "data": [{"file": os.path.basename(p), **file_fingerprint(p)} for p in data_files],
            "tokenizer": file_fingerprint(tok) if tok and os.path.isfile(tok) else None}


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def recipe_differences(old: dict, new: dict) -> list[tuple[str, Any, Any]]:
    """``[(dotted key, old value, new value)]`` for every leaf that differs (missing leaves as ``<unset>``)."""
    a, b = _flatten(old), _flatten(new)
    return [(k, a.get(k, "<unset>"), b.get(k, "<unset>")) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def check_resume(stored: dict, current: dict, tag_dir: str) -> list[str]:
    """Raise :class:`RunMismatchError` listing every unsafe difference between ``stored`` (the checkpoint's
    ``run.json``) and ``current``; returns the accepted (safe) changes as ``"key: old -> new"`` lines."""
    diffs = recipe_differences(stored.get("recipe", {}), current["recipe"])
    unsafe = [f"{k}: {o!r} -> {n!r}" for k, o, n in diffs if k not in SAFE_CHANGES]
    safe = [f"{k}: {o!r} -> {n!r}" for k, o, n in diffs if k in SAFE_CHANGES]
    if stored.get("data") != current["data"]:
        unsafe.append(f"data files changed: {_short(stored.get('data'))} -> {_short(current['data'])}")
    if stored.get("tokenizer") != current["tokenizer"]:
        unsafe.append("the run's tokenizer/tokenizer.json differs from the one this checkpoint was trained with")
    if unsafe:
        raise RunMismatchError(
            f"Cannot resume {tag_dir}: the run changed since this checkpoint was written:\n  - "
            + "\n  - ".join(unsafe)
            + f"\nOnly {', '.join(sorted(SAFE_CHANGES))} may change on resume. Restore the old values, train into "
              f"another --output-dir, or start afresh with --no-resume.")
    return safe


def _short(data) -> str:
    return ", ".join(f"{d['file']} ({d['size']} B, {d['sha256'][:10]})" for d in data or []) or "none"


def read_run_info(tag_dir: str) -> dict:
    """The checkpoint's ``run.json`` (raises :class:`RunMismatchError` naming the file when absent or unreadable)."""
    path = os.path.join(tag_dir, RUN_INFO)
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise RunMismatchError(f"{path} is missing or unreadable ({e}): cannot tell which recipe this checkpoint "
                               f"was trained with. Start afresh with --no-resume.") from None


def write_json_atomically(path: str, obj: Any) -> None:
    """Write ``obj`` as JSON to ``path`` via a fsynced temporary file and ``os.replace``."""
    tmp = path + STAGING
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def recover_dir(target: str) -> None:
    """Undo a killed :func:`save_tokenizer_atomically`: restore ``target.old`` if ``target`` is gone, drop leftovers."""
    old, staging = target + OLD, target + STAGING
    if os.path.isdir(old):
        if os.path.isdir(target):
            shutil.rmtree(old)
        else:
            os.rename(old, target)
    if os.path.isdir(staging):
        shutil.rmtree(staging)


def save_tokenizer_atomically(tokenizer, target: str) -> None:
    """``tokenizer.save_pretrained`` into ``target.tmp``, then swap it in (a kill leaves the old or the new one)."""
    from .checkpoint import fsync_tree

    recover_dir(target)
    staging = target + STAGING
    tokenizer.save_pretrained(staging)
    fsync_tree(staging)
    replace_dir(staging, target)
