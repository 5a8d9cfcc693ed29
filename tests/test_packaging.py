"""setup.py ships every subpackage: a regular (non-editable) install must contain all the code the package has."""
import os
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_every_subpackage_is_listed_in_setup_py():
    text = (ROOT / "setup.py").read_text(encoding="utf-8")
    listed = set(re.findall(r'"(moduleformer_exit(?:\.[a-z_]+)*)"', text.split("packages=[", 1)[1].split("]", 1)[0]))
    found = set()
    for directory, _, files in os.walk(ROOT / "moduleformer_exit", followlinks=True):  # through the symlinks
        if "__init__.py" in files and "__pycache__" not in directory:
            found.add(".".join(Path(directory).relative_to(ROOT).parts))
    assert found - listed == set(), f"subpackages missing from setup.py packages=[...]: {sorted(found - listed)}"
