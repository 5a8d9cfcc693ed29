"""Test-only launcher: run ``pretrain.main`` and SIGKILL this process at one phase of the run.

    python tests/helpers/kill_pretrain.py PHASE:STEP PRETRAIN_ARGS...

Phases (``STEP`` is the training step, or the step whose checkpoint is being saved):
    after_step         right after train step STEP is logged
    before_staging     a save starts (nothing written yet)
    after_staging      DeepSpeed's files, RNG and run.json written to step_<N>.tmp, not swapped in
    between_renames    the old step_<N> moved to step_<N>.old, the new one not yet renamed into place
    after_swap         step_<N> replaced, ``latest`` not yet moved
    after_pointer      ``latest`` moved, old checkpoints not yet pruned
The production code has no hook: the phases are the checkpoint module's functions, wrapped here.
"""
import os
import signal
import sys

from moduleformer_exit.training import checkpoint as ckpt
from moduleformer_exit.training import logging_utils, pretrain

PHASE, STEP = sys.argv[1].split(":")
STEP = int(STEP)
saving = {"step": None}


def kill() -> None:
    if int(os.environ.get("RANK", "0")) == 0:
        os.kill(os.getpid(), signal.SIGKILL)


def wrap(name: str, before: bool = False):
    inner = getattr(ckpt, name)

    def wrapped(*args, **kwargs):
        if before and saving["step"] == STEP:
            kill()
        out = inner(*args, **kwargs)
        if not before and saving["step"] == STEP:
            kill()
        return out
    setattr(ckpt, name, wrapped)


_save = ckpt.save_checkpoint


def save_checkpoint(engine, ckpt_dir, step, *args, **kwargs):
    saving["step"] = step
    try:
        return _save(engine, ckpt_dir, step, *args, **kwargs)
    finally:
        saving["step"] = None


ckpt.save_checkpoint = save_checkpoint
if PHASE == "after_step":
    _log = logging_utils.JsonlLogger.log

    def log(self, record):
        _log(self, record)
        if record.get("kind") == "train" and record.get("step") == STEP:
            kill()
    logging_utils.JsonlLogger.log = log
elif PHASE == "before_staging":
    wrap("write_staging", before=True)
elif PHASE == "after_staging":
    wrap("write_staging")
elif PHASE == "between_renames":
    _rename = os.rename
    calls = {"n": 0}

    def rename(src, dst):
        _rename(src, dst)
        if saving["step"] == STEP and str(src).endswith(f"step_{STEP}"):  # the old dir just moved to .old
            kill()
    ckpt.os.rename = rename  # noqa: the checkpoint module's os is the global os module
elif PHASE == "after_swap":
    wrap("replace_dir")
elif PHASE == "after_pointer":
    wrap("write_pointer_atomically")
else:
    raise SystemExit(f"unknown phase {PHASE}")

sys.exit(pretrain.main(sys.argv[2:]))
