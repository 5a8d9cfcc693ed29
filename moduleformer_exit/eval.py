"""``python -m moduleformer_exit.eval ...``: lm-eval's CLI with the ``moduleformer-exit`` model type and the shipped
tasks (the same as ``moduleformer-exit eval``; see :mod:`moduleformer_exit.evaluation.cli`)."""
import sys

from .evaluation.cli import main

if __name__ == "__main__":
    sys.exit(main())
