"""Datasets of the shipped Austen tasks (``custom_dataset`` of the YAMLs here): JSONL files next to this module, so
the tasks work offline from a source checkout or an installed package alike."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

HERE = Path(__file__).parent


def _load(name: str):
    from datasets import Dataset, DatasetDict

    with open(HERE / name, encoding="utf-8") as handle:
        rows = [json.loads(line) for line in handle if line.strip()]
    return DatasetDict({"test": Dataset.from_list(rows)})


def heldout(**metadata: Any):
    """``{"test": Dataset(text)}``: the quickstart's held-out paragraphs (lm-eval passes task metadata; unused)."""
    return _load("austen_heldout.jsonl")


def lastword(**metadata: Any):
    """``{"test": Dataset(context, target, text)}``: last-word prediction built from the held-out paragraphs."""
    return _load("austen_lastword.jsonl")
