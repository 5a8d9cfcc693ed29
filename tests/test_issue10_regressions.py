"""Tests that can fail where none could (issue #10 item 15, data and exits side), plus the tokenizer's length limit
(item 14): the streaming split never leaks a held-out document into training, ``fit_cast_matrices`` uses only the
real tokens of a padded batch, and a trained tokenizer carries no position limit the model lacks."""
import pytest
import torch

from conftest import tiny_config_kwargs
from moduleformer_exit import ModuleFormerConfig, MultiExitConfiguration, MultiExitModuleFormer
from moduleformer_exit.multi_exit_config import VocabularyProjectionMode
from moduleformer_exit.multi_exit_models import fit_cast_matrices


@pytest.mark.parametrize("fraction,seed", [(0.1, 3), (0.25, 0), (0.5, 7)])
def test_streaming_split_is_a_partition_of_the_documents(fraction, seed):
    datasets = pytest.importorskip("datasets")
    from moduleformer_exit.training.data import split_documents

    docs = [f"document number {i}" for i in range(40)]
    stream = datasets.Dataset.from_dict({"text": docs}).to_iterable_dataset()
    train, held = split_documents(stream, fraction, seed)
    train, held = [r["text"] for r in train], [r["text"] for r in held]
    assert not set(train) & set(held)  # no held-out document is trained on
    assert sorted(train + held) == sorted(docs) and len(train + held) == len(docs)
    every = max(2, round(1 / fraction))  # every ``every``-th document, by position
    assert held == [d for i, d in enumerate(docs) if i % every == seed % every]


def test_fit_cast_matrices_uses_only_real_tokens():
    torch.manual_seed(0)
    config = ModuleFormerConfig(**tiny_config_kwargs(n_layer=2))
    model = MultiExitModuleFormer(config, multi_exit_config=MultiExitConfiguration(
        lm_head_layer_indices=(1, 2), vocab_projection_mode=VocabularyProjectionMode.SHARED_PROJECTION_CAST_OUTPUTS))
    model.eval()
    lengths = [30, 18, 24]
    ids = torch.randint(3, config.vocab_size, (3, 30), generator=torch.Generator().manual_seed(1))
    mask = torch.zeros(3, 30, dtype=torch.long)
    for row, n in enumerate(lengths):
        mask[row, :n] = 1
    residuals = fit_cast_matrices(model, [ids], [mask])
    # independent reference: each sequence alone (no padding at all), float64 normal equations
    xs, ys = [], []
    with torch.no_grad():
        for row, n in enumerate(lengths):
            hidden = model.backbone(ids[row:row + 1, :n], output_hidden_states=True, use_cache=False).hidden_states
            xs.append(model.final_norm()(hidden[1])[0].double())
            ys.append(hidden[2][0].double())
    x, y = torch.cat(xs), torch.cat(ys)
    # LayerNorm rows sum to ~0, so W is not unique; the least-squares residual is
    w = torch.linalg.lstsq(x, y, driver="gelsd").solution
    expected = float((x @ w - y).norm() / y.norm())
    assert residuals[1] == pytest.approx(expected, rel=1e-5)


def test_trained_tokenizer_has_no_position_limit(tmp_path):
    pytest.importorskip("tokenizers")
    from transformers import AutoTokenizer

    from moduleformer_exit.training.data import train_tokenizer

    tok = train_tokenizer(["a few words to learn from"] * 10, vocab_size=300)
    tok.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    assert reloaded.model_max_length >= 10 ** 20
    ids = reloaded("words " * 5000).input_ids  # no truncation, no "longer than the specified maximum"
    assert len(ids) >= 5000
