"""Corpora through ``datasets``, a byte-level BPE tokenizer, packing into fixed-length blocks, deterministic shuffling.

Pipeline (:func:`build_lm_data`): ``load_dataset("text"/"json"/"parquet", data_files=...)`` -> held-out split by
document (seeded) -> tokenizer (trained on the training documents with ``tokenizers``, or loaded) -> tokenize with
``map`` (no special tokens, EOS appended to every document) -> pack into ``block_size`` blocks with ``map`` (EOS
between documents, the tail shorter than a block dropped) -> ``LongTensor [n_blocks, block_size]``.

Training order (:class:`BlockOrder`): sample position ``i`` (a global counter over the run) reads block
``perm_e[i % n]`` with ``e = i // n`` and ``perm_e`` a seeded permutation of epoch ``e``; resuming at a position
therefore reproduces the order exactly, whatever the number of processes.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from importlib.resources import files as _package_files
from typing import Iterable, Iterator, Optional, Sequence

import torch

PAD_TOKEN, BOS_TOKEN, EOS_TOKEN = "<|pad|>", "<|bos|>", "<|eos|>"
SPECIAL_TOKENS = (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN)  # ids 0, 1, 2 (= ModuleFormer's pad / bos / eos defaults)
DATA_FORMATS = ("text", "json", "parquet")
BUNDLED_PREFIX = "bundled:"


def bundled_corpus_files(name: str = "austen") -> list[str]:
    """Paths of a corpus shipped with the package (``moduleformer_exit/data/<name>/*.txt``)."""
    root = _package_files("moduleformer_exit.data") / name
    if not root.is_dir():
        raise FileNotFoundError(f"No bundled corpus {name!r} (expected moduleformer_exit/data/{name}/).")
    return sorted(str(p) for p in root.iterdir() if p.name.endswith(".txt"))


def resolve_data_files(data_files: Sequence[str] | str) -> list[str]:
    """Expand ``"bundled:<name>"`` entries; check every other path exists."""
    if isinstance(data_files, str):
        data_files = [data_files]
    out: list[str] = []
    for f in data_files:
        if f.startswith(BUNDLED_PREFIX):
            out.extend(bundled_corpus_files(f[len(BUNDLED_PREFIX):]))
        else:
            if not os.path.isfile(f):
                raise FileNotFoundError(f"Data file {f!r} does not exist.")
            out.append(os.path.abspath(f))
    return out


_SNIFF_BYTES = 1 << 16


def check_data_files(paths: Sequence[str], data_format: str = "text") -> None:
    """Raise ValueError naming the file and the problem if a data file cannot be what ``data_format`` says: empty or
    whitespace-only, binary (NUL bytes) or invalid UTF-8 text, JSON that is neither JSON lines nor a JSON document,
    or parquet without the parquet magic. Checked before any work starts (``datasets`` fails far later, unnamed)."""
    import codecs
    import json

    for path in paths:
        size = os.path.getsize(path)
        hint = f"Fix or remove {path} from the data files."
        if size == 0:
            raise ValueError(f"Data file {path} is empty (0 bytes). {hint}")
        if data_format == "parquet":
            with open(path, "rb") as f:
                if f.read(4) != b"PAR1":
                    raise ValueError(f"Data file {path} is not a parquet file (no PAR1 magic) but the format is "
                                     f"parquet. {hint}")
            continue
        decoder = codecs.getincrementaldecoder("utf-8")()
        seen_text, offset, head = False, 0, ""
        with open(path, "rb") as f:
            while chunk := f.read(_SNIFF_BYTES):
                nul = chunk.find(b"\0")
                if nul >= 0:
                    raise ValueError(f"Data file {path} looks binary (NUL byte at offset {offset + nul}), not "
                                     f"{data_format} text. {hint}")
                try:
                    text = decoder.decode(chunk)
                except UnicodeDecodeError as e:
                    raise ValueError(f"Data file {path} is not valid UTF-8 (byte offset {offset + e.start}). Convert "
                                     f"it (e.g. iconv -f latin1 -t utf-8). {hint}") from None
                seen_text = seen_text or bool(text.strip())
                if len(head) < _SNIFF_BYTES:
                    head += text
                offset += len(chunk)
            try:
                decoder.decode(b"", final=True)
            except UnicodeDecodeError:
                raise ValueError(f"Data file {path} ends inside a UTF-8 character (truncated?). {hint}") from None
        if not seen_text:
            raise ValueError(f"Data file {path} holds only whitespace: nothing to train on. {hint}")
        if data_format == "json":
            first = head.lstrip()
            line = first.split("\n", 1)[0]
            try:
                json.loads(line)
            except ValueError:
                if not first.startswith(("[", "{")):
                    raise ValueError(f"Data file {path} is not JSON lines (first line {line[:60]!r} is not JSON) but "
                                     f"the format is json; use format text for plain text. {hint}") from None


def load_corpus(data_files: Sequence[str] | str, data_format: str = "text", sample_by: str = "paragraph",
                streaming: bool = False, text_field: str = "text"):
    """A ``datasets`` Dataset (or IterableDataset with ``streaming``) with one ``text`` column, one document a row.

    ``data_format``: ``text`` (``sample_by`` = ``paragraph`` | ``line`` | ``document``), ``json`` / ``parquet``
    (``text_field`` names the text column)."""
    from datasets import load_dataset

    if data_format not in DATA_FORMATS:
        raise ValueError(f"data format must be one of {DATA_FORMATS}, got {data_format!r}.")
    data_files = resolve_data_files(data_files)
    kwargs = {"sample_by": sample_by} if data_format == "text" else {}
    ds = load_dataset(data_format, data_files={"train": data_files}, split="train", streaming=streaming, **kwargs)
    if text_field != "text":
        ds = ds.rename_column(text_field, "text")
    extra = [c for c in (ds.column_names or []) if c != "text"]
    if extra:
        ds = ds.remove_columns(extra)
    return ds.filter(lambda row: bool(row["text"] and row["text"].strip()))


def train_tokenizer(texts: Iterable[str], vocab_size: int = 2048, model_max_length: Optional[int] = None,
                    min_frequency: int = 2):
    """Train a byte-level BPE tokenizer and wrap it as a transformers ``PreTrainedTokenizerFast`` with
    ``<|pad|>`` (0), ``<|bos|>`` (1), ``<|eos|>`` (2). Lossless on any UTF-8 text (byte alphabet).

    ``model_max_length`` defaults to transformers' "no limit" value: a ModuleFormer has no position limit (stick-
    breaking attention, no position embeddings), so no "longer than the specified maximum" warning applies."""
    from transformers.tokenization_utils_base import VERY_LARGE_INTEGER

    if model_max_length is None:
        model_max_length = VERY_LARGE_INTEGER
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size must be >= {256 + len(SPECIAL_TOKENS)} (bytes + specials), got {vocab_size}.")
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                  special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD_TOKEN, bos_token=BOS_TOKEN,
                                   eos_token=EOS_TOKEN, model_max_length=model_max_length)


def pack_blocks(token_lists: Iterable[Sequence[int]], block_size: int, eos_id: int) -> list[list[int]]:
    """Concatenate documents, each followed by ``eos_id``, and cut into ``block_size`` blocks (tail dropped).

    ``pack_blocks([[5, 6, 7], [8, 9]], 3, 2) == [[5, 6, 7], [2, 8, 9]]`` (the final ``[2]`` is dropped)."""
    if block_size < 2:
        raise ValueError(f"block_size must be >= 2, got {block_size}.")
    stream: list[int] = []
    for ids in token_lists:
        stream.extend(ids)
        stream.append(eos_id)
    n = len(stream) // block_size
    return [stream[i * block_size:(i + 1) * block_size] for i in range(n)]


def tokenize_and_pack(dataset, tokenizer, block_size: int, num_proc: Optional[int] = None,
                      map_batch_size: int = 1000):
    """``map`` twice: tokenize (no special tokens), then pack (EOS between documents) into ``input_ids`` blocks.

    Packing happens within each ``map`` batch of ``map_batch_size`` documents (one short tail dropped per batch)."""
    eos_id = tokenizer.eos_token_id

    def tokenize(batch):
        return {"ids": tokenizer(batch["text"], add_special_tokens=False, verbose=False)["input_ids"]}

    def pack(batch):
        return {"input_ids": pack_blocks(batch["ids"], block_size, eos_id)}

    kw = {} if num_proc is None or _is_iterable(dataset) else {"num_proc": num_proc}
    tokenized = dataset.map(tokenize, batched=True, batch_size=map_batch_size, remove_columns=["text"], **kw)
    return tokenized.map(pack, batched=True, batch_size=map_batch_size, remove_columns=["ids"], **kw)


def _is_iterable(dataset) -> bool:
    from datasets import IterableDataset

    return isinstance(dataset, IterableDataset)


def blocks_to_tensor(packed, max_blocks: Optional[int] = None) -> torch.Tensor:
    """Materialise packed blocks (Dataset or IterableDataset) as ``LongTensor [n, block_size]``."""
    rows = []
    for row in packed:
        rows.append(row["input_ids"])
        if max_blocks is not None and len(rows) >= max_blocks:
            break
    if not rows:
        raise ValueError("The corpus yields no complete block: use more text or a smaller block_size.")
    return torch.tensor(rows, dtype=torch.long)


def split_documents(dataset, heldout_fraction: float, seed: int):
    """Seeded document-level split -> ``(train, heldout)`` (for a streaming dataset: every ``1/f``-th document,
    deterministically, goes to held-out)."""
    if not 0 < heldout_fraction < 1:
        raise ValueError(f"heldout_fraction must be in (0, 1), got {heldout_fraction}.")
    if _is_iterable(dataset):
        every = max(2, round(1 / heldout_fraction))
        ds = dataset.map(lambda row, idx: {"_i": idx}, with_indices=True)
        return (ds.filter(lambda r: r["_i"] % every != seed % every).remove_columns(["_i"]),
                ds.filter(lambda r: r["_i"] % every == seed % every).remove_columns(["_i"]))
    split = dataset.train_test_split(test_size=heldout_fraction, seed=seed, shuffle=True)
    return split["train"], split["test"]


@dataclass
class LMData:
    """Packed training / held-out blocks and the tokenizer."""

    train: torch.Tensor      # [n_train, block_size]
    heldout: torch.Tensor    # [n_heldout, block_size]
    tokenizer: object


def build_lm_data(data_files: Sequence[str] | str, block_size: int, *, data_format: str = "text",
                  sample_by: str = "paragraph", text_field: str = "text", streaming: bool = False,
                  heldout_fraction: float = 0.05, seed: int = 1234, tokenizer=None, vocab_size: int = 2048,
                  max_train_blocks: Optional[int] = None, max_heldout_blocks: Optional[int] = None,
                  num_proc: Optional[int] = None) -> LMData:
    """Load, split, (train the tokenizer,) tokenize and pack a corpus; see the module docstring."""
    corpus = load_corpus(data_files, data_format, sample_by, streaming, text_field)
    train_docs, heldout_docs = split_documents(corpus, heldout_fraction, seed)
    if tokenizer is None:
        tokenizer = train_tokenizer((row["text"] for row in train_docs), vocab_size=vocab_size)
    elif isinstance(tokenizer, (str, os.PathLike)):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(tokenizer)
    if tokenizer.eos_token_id is None:
        raise ValueError("The tokenizer has no eos_token: packing needs one to separate documents.")
    train = blocks_to_tensor(tokenize_and_pack(train_docs, tokenizer, block_size, num_proc), max_train_blocks)
    heldout = blocks_to_tensor(tokenize_and_pack(heldout_docs, tokenizer, block_size, num_proc), max_heldout_blocks)
    return LMData(train=train, heldout=heldout, tokenizer=tokenizer)


class BlockOrder:
    """Deterministic, seeded, epoch-wise shuffled order over ``n`` blocks, addressed by a global sample position."""

    def __init__(self, n: int, seed: int) -> None:
        if n <= 0:
            raise ValueError("BlockOrder needs at least one block.")
        self.n, self.seed = n, seed
        self._perms: dict[int, torch.Tensor] = {}

    def permutation(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perms = {epoch: torch.randperm(self.n, generator=g)}  # keep only the current epoch
        return self._perms[epoch]

    def indices(self, position: int, count: int) -> list[int]:
        """Block indices of sample positions ``position .. position + count - 1``."""
        out = []
        for i in range(position, position + count):
            out.append(int(self.permutation(i // self.n)[i % self.n]))
        return out


def batch_positions(position: int, micro_step: int, rank: int, world_size: int, micro_batch: int) -> int:
    """First sample position of ``rank``'s micro-batch ``micro_step`` in the global batch starting at ``position``."""
    return position + (micro_step * world_size + rank) * micro_batch


def unigram_perplexity(train: torch.Tensor, heldout: torch.Tensor, vocab_size: int) -> float:
    """Perplexity of an add-one-smoothed unigram model fitted on ``train`` tokens, on ``heldout``'s predicted tokens
    (positions 1..T-1 of each block, as scored by the LM)."""
    counts = torch.bincount(train.reshape(-1), minlength=vocab_size).double() + 1.0
    logp = torch.log(counts / counts.sum())
    targets = heldout[:, 1:].reshape(-1)
    return float(torch.exp(-logp[targets].mean()))


def iter_batches(blocks: torch.Tensor, batch_size: int) -> Iterator[torch.Tensor]:
    """Consecutive batches of ``blocks`` (evaluation)."""
    for i in range(0, blocks.shape[0], batch_size):
        yield blocks[i:i + batch_size]


__all__ = [
    "BlockOrder", "LMData", "build_lm_data", "bundled_corpus_files", "load_corpus", "pack_blocks",
    "tokenize_and_pack", "train_tokenizer", "unigram_perplexity", "split_documents", "batch_positions",
    "blocks_to_tensor", "check_data_files", "resolve_data_files", "iter_batches", "SPECIAL_TOKENS",
]
