"""Training data pipeline and recipe validation (in-process, fast): packing, shuffling, splitting, tokenizer, recipes."""
import json
import math

import pytest
import torch

pytest.importorskip("datasets")
pytest.importorskip("tokenizers")

from moduleformer_exit.training.data import (  # noqa: E402
    BlockOrder, batch_positions, build_lm_data, load_corpus, pack_blocks, split_documents, tokenize_and_pack,
    train_tokenizer, unigram_perplexity,
)
from moduleformer_exit.training.recipe import RecipeError, bundled_recipe_path, list_recipes, load_recipe  # noqa: E402


def test_pack_blocks_hand_computed():
    assert pack_blocks([[5, 6, 7], [8, 9]], 3, 2) == [[5, 6, 7], [2, 8, 9]]  # tail [2] dropped
    assert pack_blocks([[1], [2, 3, 4, 5]], 2, 0) == [[1, 0], [2, 3], [4, 5]]  # tail [0] dropped
    assert pack_blocks([[1, 2]], 3, 9) == [[1, 2, 9]]
    assert pack_blocks([[1]], 3, 9) == []
    with pytest.raises(ValueError, match="block_size"):
        pack_blocks([[1]], 1, 0)


def test_block_order_hand_computed_and_resumable():
    order = BlockOrder(5, seed=7)
    perm0 = torch.randperm(5, generator=torch.Generator().manual_seed(7 * 1_000_003 + 0)).tolist()
    perm1 = torch.randperm(5, generator=torch.Generator().manual_seed(7 * 1_000_003 + 1)).tolist()
    assert order.indices(0, 5) == perm0
    assert order.indices(3, 4) == perm0[3:] + perm1[:2]  # crosses the epoch boundary
    assert sorted(order.indices(5, 5)) == list(range(5))  # every epoch is a permutation
    assert perm0 != perm1
    # a fresh order (a resumed run) gives the same blocks from any position
    assert BlockOrder(5, seed=7).indices(7, 6) == order.indices(0, 13)[7:]
    assert BlockOrder(5, seed=8).indices(0, 5) != perm0 or BlockOrder(5, seed=9).indices(0, 5) != perm0


def test_batch_positions_hand_computed():
    # global batch of 2 ranks x 2 micro-steps x 3 samples starting at position 12
    assert [batch_positions(12, m, r, 2, 3) for m in range(2) for r in range(2)] == [12, 15, 18, 21]


def test_load_corpus_paragraphs_and_split(tmp_path):
    f = tmp_path / "c.txt"
    f.write_text("one a\ntwo\n\nthree\n\n\nfour five\n\n" + "\n\n".join(f"p{i}" for i in range(40)) + "\n")
    ds = load_corpus([str(f)], "text", "paragraph")
    assert ds[0]["text"].strip() == "one a\ntwo" and ds[1]["text"].strip() == "three" and len(ds) == 43
    a_train, a_held = split_documents(ds, 0.1, seed=3)
    b_train, b_held = split_documents(ds, 0.1, seed=3)
    assert a_held["text"] == b_held["text"] and a_train["text"] == b_train["text"]  # deterministic
    assert not set(a_held["text"]) & set(a_train["text"]) and len(a_held) + len(a_train) == 43
    jf = tmp_path / "c.jsonl"
    jf.write_text("\n".join(json.dumps({"body": t, "id": i}) for i, t in enumerate(["x y", "z"])))
    assert load_corpus([str(jf)], "json", text_field="body")["text"] == ["x y", "z"]


def test_tokenizer_roundtrip_and_specials(tmp_path):
    from transformers import AutoTokenizer

    texts = ["It is a truth universally acknowledged.", "naïve café — 😀"] * 20
    tok = train_tokenizer(texts, vocab_size=300)
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    tok.save_pretrained(tmp_path / "tok")
    again = AutoTokenizer.from_pretrained(tmp_path / "tok")
    for s in ("naïve café — 😀 unseen ŧext", "It is a truth"):
        ids = again(s, add_special_tokens=False).input_ids
        assert again.decode(ids) == s
        assert ids == tok(s, add_special_tokens=False).input_ids


def test_tokenize_and_pack_matches_hand_packing():
    from datasets import Dataset

    docs = ["alpha beta gamma", "delta", "epsilon zeta eta theta", "iota kappa"]
    tok = train_tokenizer(docs * 5, vocab_size=280)
    packed = tokenize_and_pack(Dataset.from_dict({"text": docs}), tok, block_size=4)
    ids = [tok(d, add_special_tokens=False).input_ids for d in docs]
    assert packed["input_ids"] == pack_blocks(ids, 4, tok.eos_token_id)
    stream = [t for doc in ids for t in doc + [tok.eos_token_id]]
    assert packed["input_ids"] == [stream[i:i + 4] for i in range(0, len(stream) // 4 * 4, 4)]


def test_build_lm_data_streaming_equals_materialised(tmp_path):
    f = tmp_path / "c.txt"
    f.write_text("\n\n".join(f"Paragraph number {i} has some words in it." for i in range(60)))
    tok = train_tokenizer([f.read_text()], vocab_size=300)
    a = build_lm_data([str(f)], 16, tokenizer=tok, heldout_fraction=0.1, seed=1)
    b = build_lm_data([str(f)], 16, tokenizer=tok, heldout_fraction=0.1, seed=1)
    assert torch.equal(a.train, b.train) and torch.equal(a.heldout, b.heldout)
    s = build_lm_data([str(f)], 16, tokenizer=tok, heldout_fraction=0.1, seed=1, streaming=True)
    assert s.train.shape[1] == 16 and s.heldout.shape[0] > 0


def test_unigram_perplexity_hand_computed():
    train = torch.tensor([[0, 0, 1]])  # counts+1: [3, 2, 1] over vocab 3 -> p = [1/2, 1/3, 1/6]
    held = torch.tensor([[2, 0, 1]])   # predicted tokens: 0, 1
    expected = math.exp(-(math.log(1 / 2) + math.log(1 / 3)) / 2)
    assert unigram_perplexity(train, held, 3) == pytest.approx(expected)


def test_bundled_recipes_are_valid():
    names = list_recipes()
    assert {"quickstart", "tiny"} <= set(names)
    for name in names:
        with open(bundled_recipe_path(name), encoding="utf-8") as f:
            if json.load(f).get("training", {}).get("init_from"):  # continues another run: validated once that run
                continue  # exists (test_training_reliability.py::test_init_from_continues_a_trained_run...)
        load_recipe(name)


@pytest.mark.parametrize("override, message", [
    ("training.max_steps=0", "training.max_steps must be a positive integer"),
    ("training.lr=-1", "training.lr must be a number in (0, 1)"),
    ("training.warmup_steps=50", "must be smaller than training.max_steps"),
    ("training.optimizer=\"sgd\"", "training.optimizer must be 'client'"),
    ("training.bogus=1", "unknown key training.bogus"),
    ("deepspeed.zero_optimization.stage=5", "stage must be 0, 1, 2 or 3"),
    ("deepspeed.train_micro_batch_size_per_gpu=0", "train_micro_batch_size_per_gpu must be a positive integer"),
    ("deepspeed.train_batch_size=8", "train_batch_size is computed"),
    *([] if torch.cuda.is_available() else [("deepspeed.fp16={\"enabled\":true}", "fp16")]),  # fp16 is CPU-invalid
    ("exits.layers=[3]", "exits.layers [3] out of range: the model has 2 layers"),
    ("data.files=[\"/nonexistent/corpus.txt\"]", "does not exist"),
    ("data.block_size=1", "data.block_size must be an integer >= 2"),
    ("data.vocab_size=100", "data.vocab_size must be an integer >= 259"),
    ("model.k_att=9", "model:"),
    ("model.not_a_field=1", "unknown model field 'not_a_field'"),
])
def test_bad_recipe_values_give_clear_errors(override, message):
    with pytest.raises(RecipeError) as e:
        load_recipe("tiny", [override])
    assert message in str(e.value)


def test_bad_recipe_stops_before_any_work(tmp_path, capsys):
    from moduleformer_exit.cli import main

    out = tmp_path / "run"
    rc = main(["pretrain", "tiny", "--output-dir", str(out), "--set", "training.lr=2", "--set", "exits.layers=[7]"])
    err = capsys.readouterr().err
    assert rc == 2 and "training.lr" in err and "exits.layers [7]" in err  # every problem listed at once
    assert not out.exists()
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert main(["pretrain", str(bad), "--output-dir", str(out)]) == 2
    assert "not valid JSON" in capsys.readouterr().err and not out.exists()


def test_warmup_cosine_schedule():
    from moduleformer_exit.training.pretrain import warmup_cosine

    fn = warmup_cosine(warmup=2, total=10, min_ratio=0.1)
    assert [fn(0), fn(1)] == [0.5, 1.0]
    assert fn(2) == pytest.approx(1.0) and fn(10) == pytest.approx(0.1)
    assert fn(6) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))

