"""``moduleformer-exit eval`` / ``python -m moduleformer_exit.eval``: lm-eval's own CLI with the ``moduleformer-exit``
model type registered, the shipped tasks on the include path and ``--model moduleformer-exit`` as the default, so every
lm-eval flag works (``--tasks``, ``--model_args``, ``--limit``, ``--batch_size``, ``--output_path``, ``ls tasks``...).
Hyphenated spellings of lm-eval's flags (``--model-args``) are accepted too."""
from __future__ import annotations

import sys
from typing import Optional, Sequence

SUBCOMMANDS = ("run", "ls", "validate")


def normalize_flags(argv: Sequence[str]) -> list[str]:
    """``--model-args x`` / ``--model-args=x`` -> ``--model_args ...`` (lm-eval's flags all use underscores)."""
    out = []
    for arg in argv:
        if arg.startswith("--") and len(arg) > 2:
            name, sep, value = arg[2:].partition("=")
            arg = "--" + name.replace("-", "_") + sep + value
        out.append(arg)
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Parse ``argv`` with lm-eval's ``HarnessCLI`` (``run`` inserted when no subcommand is given), add the shipped
    tasks and the default model type, and execute it."""
    from . import MODEL_TYPE, include_paths, register

    try:
        register()
    except ImportError as error:
        raise SystemExit(str(error))
    from lm_eval._cli import HarnessCLI
    from lm_eval.utils import setup_logging

    argv = normalize_flags(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] not in SUBCOMMANDS and argv[0] not in ("-h", "--help"):
        argv = ["run", *argv]
    setup_logging()
    parser = HarnessCLI()
    saved, sys.argv = sys.argv, ["lm-eval", *argv]  # HarnessCLI reads sys.argv
    try:
        args = parser.parse_args()
    finally:
        sys.argv = saved
    if getattr(args, "command", None) in SUBCOMMANDS:
        args.include_path = include_paths(args.include_path)
    if getattr(args, "command", None) == "run" and args.model is None and args.config is None:
        args.model = MODEL_TYPE
    parser.execute(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
