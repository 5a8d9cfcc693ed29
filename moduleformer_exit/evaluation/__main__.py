"""``python -m moduleformer_exit.evaluation``: the same as ``moduleformer-exit eval``."""
import sys

from .cli import main

sys.exit(main())
