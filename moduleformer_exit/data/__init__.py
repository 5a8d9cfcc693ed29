"""Package data: the bundled Austen corpus (``austen/``)."""
