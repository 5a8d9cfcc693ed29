"""The ``usage`` and ``prune`` commands end to end on a tiny multi-exit checkpoint with its own tokenizer and local
text: files written, the pruned checkpoint reloads smaller, pruning.json agrees with the weights, bad input."""
import json
import os

import pytest
import torch

pytest.importorskip("datasets")

from moduleformer_exit import ModuleFormerConfig, MultiExitConfiguration, MultiExitModuleFormer  # noqa: E402
from moduleformer_exit.cli import main  # noqa: E402
from moduleformer_exit.pruning.io import load_moduleformer  # noqa: E402

from conftest import tiny_config_kwargs  # noqa: E402

AUSTEN = os.path.join(os.path.dirname(__file__), "..", "moduleformer_exit", "data", "austen", "persuasion.txt")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from moduleformer_exit.training.data import train_tokenizer

    root = tmp_path_factory.mktemp("ckpt")
    text = open(AUSTEN, encoding="utf-8").read()[:60000]
    corpus = root / "corpus.txt"
    corpus.write_text(text, encoding="utf-8")
    tokenizer = train_tokenizer(text.split("\n\n"), vocab_size=300, model_max_length=32)
    torch.manual_seed(0)
    config = ModuleFormerConfig(**tiny_config_kwargs(vocab_size=len(tokenizer), block_size=32))
    config.lm_head_layer_indices = [1]
    model = MultiExitModuleFormer(config, multi_exit_config=MultiExitConfiguration())
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    return root


def test_usage_command(checkpoint, tmp_path):
    assert main(["usage", "--model", str(checkpoint / "model"), "--data", str(checkpoint / "corpus.txt"),
                 "--max-tokens", "500", "--out", str(tmp_path)]) == 0
    usage = json.loads((tmp_path / "usage.json").read_text())
    assert usage["schema_version"] == 1 and 500 <= usage["tokens"] < 500 + 8 * 32
    assert sum(usage["counts"]["mlp"][0]) == 2 * usage["tokens"]
    assert (tmp_path / "usage.png").stat().st_size > 1000


def test_prune_command_and_reload(checkpoint, tmp_path):
    out = tmp_path / "pruned"
    assert main(["prune", "--model", str(checkpoint / "model"), "--data", str(checkpoint / "corpus.txt"),
                 "--keep-mlp", "0.5", "--keep-att", "3", "--criterion", "reconstruction", "--calib-blocks", "4",
                 "--heldout-blocks", "4", "--out", str(out)]) == 0
    record = json.loads((out / "pruning.json").read_text())
    assert record["criterion"] == "reconstruction" and len(record["calibration_hash"]) == 16
    assert set(record["perplexity_before"]) == {"final", "exit1"} == set(record["perplexity_after"])
    assert record["checkpoint_bytes_after"] < record["checkpoint_bytes_before"]
    model = load_moduleformer(str(out))
    assert model.config.n_mlp_experts == 3 and model.config.n_att_experts == 3
    for layer, ids in enumerate(record["kept"]["mlp"]):
        assert len(ids) == 3
    original = load_moduleformer(str(checkpoint / "model"))
    ids = record["kept"]["mlp"][1]
    assert torch.equal(model.transformer.h[1].mlpf.experts.weight, original.transformer.h[1].mlpf.experts.weight[ids])
    assert model.name_to_lm_exit_head["lm_head_1"].weight.shape[0] == model.config.vocab_size


def test_prune_command_rejects_other_models_usage(checkpoint, tmp_path):
    main(["usage", "--model", str(checkpoint / "model"), "--data", str(checkpoint / "corpus.txt"),
          "--max-tokens", "64", "--out", str(tmp_path)])
    other = load_moduleformer(str(checkpoint / "model"))
    with torch.no_grad():
        other.transformer.h[0].mlpf.gate.w_gate[3].weight.add_(0.1)
    other.save_pretrained(tmp_path / "other")
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(checkpoint / "model").save_pretrained(tmp_path / "other")
    with pytest.raises(ValueError, match="collected on another model"):
        main(["prune", "--model", str(tmp_path / "other"), "--data", str(checkpoint / "corpus.txt"), "--keep-mlp",
              "0.5", "--criterion", "frequency", "--usage", str(tmp_path / "usage.json"), "--calib-blocks", "2",
              "--heldout-blocks", "2", "--out", str(tmp_path / "x")])
    with pytest.raises(ValueError, match="keep at least 2"):
        main(["prune", "--model", str(checkpoint / "model"), "--data", str(checkpoint / "corpus.txt"), "--keep-mlp",
              "0.1", "--criterion", "random", "--calib-blocks", "2", "--heldout-blocks", "2",
              "--out", str(tmp_path / "y")])
