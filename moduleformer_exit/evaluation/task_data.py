"""Builds the shipped offline task data from the bundled Austen corpus, deterministically.

The held-out documents are the held-out split of ``moduleformer-exit quickstart`` (paragraphs of
``moduleformer_exit/data/austen/*.txt``, non-blank ones, ``train_test_split(test_size=0.05, seed=1234)``) less the few
that also occur verbatim in its training split (chapter headings), so a quickstart model is scored on text it never
trained on. Two files are written next to the task YAMLs:

- ``austen_heldout.jsonl``: ``{"text": paragraph}`` per held-out paragraph (perplexity task);
- ``austen_lastword.jsonl``: ``{"context", "target", "text"}`` for held-out paragraphs of 15-80 words whose last word
  is alphabetic: ``target`` is that word, ``context`` the text before it (LAMBADA-style last-word prediction).

Regenerate with ``python -m moduleformer_exit.evaluation.task_data`` (needs ``datasets``, an lm-eval dependency).
"""
from __future__ import annotations

import json
import re
from importlib.resources import files as package_files
from pathlib import Path
from typing import Optional

HELDOUT_FRACTION = 0.05
SPLIT_SEED = 1234  # the quickstart recipe's split (training.data.build_lm_data defaults)
LASTWORD_MIN_WORDS, LASTWORD_MAX_WORDS = 15, 80
TASKS_DIR = Path(__file__).parent / "tasks"
HELDOUT_FILE, LASTWORD_FILE = "austen_heldout.jsonl", "austen_lastword.jsonl"
# The last word and whatever follows it (closing punctuation, quotes), at the end of a paragraph.
_LAST_WORD = re.compile(r"([A-Za-z]+)([^A-Za-z]*)$")


def corpus_files() -> list[str]:
    """The bundled Austen text files, sorted (the order the quickstart loads them in)."""
    root = package_files("moduleformer_exit.data") / "austen"
    return sorted(str(p) for p in root.iterdir() if p.name.endswith(".txt"))


def heldout_paragraphs() -> list[str]:
    """The quickstart's held-out paragraphs, in split order, less those also found verbatim among its training ones."""
    from datasets import load_dataset

    corpus = load_dataset("text", data_files={"train": corpus_files()}, split="train", sample_by="paragraph")
    corpus = corpus.filter(lambda row: bool(row["text"] and row["text"].strip()))
    split = corpus.train_test_split(test_size=HELDOUT_FRACTION, seed=SPLIT_SEED, shuffle=True)
    seen = set(split["train"]["text"])  # repeated short paragraphs ("Chapter 14", "* * *") were trained on
    return [text for text in split["test"]["text"] if text not in seen]


def last_word_example(paragraph: str) -> Optional[dict]:
    """``{"context", "target", "text"}`` of a paragraph, or None when it is too short / long or ends without a word.

    The paragraph's line breaks become spaces; ``context`` ends just before the space preceding ``target``."""
    text = " ".join(paragraph.split())
    match = _LAST_WORD.search(text)
    if match is None or not LASTWORD_MIN_WORDS <= len(text.split()) <= LASTWORD_MAX_WORDS:
        return None
    context = text[:match.start(1)]
    if not context.endswith(" "):  # the word must be a whole word preceded by a space (not 'Mrs.Smith')
        return None
    return {"context": context[:-1], "target": match.group(1), "text": text}


def build(out_dir: Path = TASKS_DIR) -> dict[str, int]:
    """Write both JSONL files into ``out_dir``; returns the number of rows of each."""
    paragraphs = heldout_paragraphs()
    examples = [e for e in map(last_word_example, paragraphs) if e is not None]
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, rows in ((HELDOUT_FILE, [{"text": p} for p in paragraphs]), (LASTWORD_FILE, examples)):
        with open(out_dir / name, "w", encoding="utf-8") as handle:
            for row in rows:
                handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    return {HELDOUT_FILE: len(paragraphs), LASTWORD_FILE: len(examples)}


if __name__ == "__main__":
    print(build())
