"""``moduleformer-exit generate --early-exit / --self-speculative`` and ``bench --only early-exit --quick``."""
import pytest

from moduleformer_exit import AutoMultiExitModel
from moduleformer_exit.cli import main
from test_cli import model_dir  # noqa: F401  (fixture: a tiny saved multi-exit model + tokenizer)


@pytest.mark.parametrize("flags", [["--self-speculative", "1", "--gamma", "2"],
                                   ["--early-exit", "calm", "--threshold", "1.0"],
                                   ["--early-exit", "free", "--exit", "1", "--threshold", "1.0"]])
def test_lossless_settings_print_plain_greedy_text(model_dir, capsys, flags):  # noqa: F811
    directory, tokenizer = model_dir
    assert main(["generate", "--model", str(directory), "--max-new-tokens", "6", *flags, "a single man"]) == 0
    printed = capsys.readouterr().out
    model = AutoMultiExitModel.from_pretrained(directory).eval()
    prompt = tokenizer("a single man", return_tensors="pt")
    tokens = model.generate(**prompt, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert printed.strip() == tokenizer.decode(tokens[0], skip_special_tokens=True).strip()


def test_bad_early_exit_options_exit_with_a_message(model_dir):  # noqa: F811
    directory, _ = model_dir
    with pytest.raises(SystemExit, match="threshold must be in"):
        main(["generate", "--model", str(directory), "--early-exit", "calm", "--threshold", "1.5", "hi"])
    with pytest.raises(SystemExit, match="gamma"):
        main(["generate", "--model", str(directory), "--self-speculative", "1", "--gamma", "0", "hi"])
    with pytest.raises(ValueError, match="has no exit head"):
        main(["generate", "--model", str(directory), "--early-exit", "static", "--exit", "2", "hi"])


def test_bench_early_exit_quick_prints_tables(capsys, tmp_path):
    assert main(["bench", "--only", "early-exit", "--quick", "--threads", "1",
                 "--early-exit-plot", str(tmp_path / "plot.png")]) == 0
    printed = capsys.readouterr().out
    for model in ("random tiny ModuleFormer", "random tiny GPT-Neo"):  # a MoE and a dense backbone, each its tables
        assert printed.count(f"{model}:") == 2  # the methods table and the latency table
    assert printed.count("self-spec k=2 g=3") == 2
    assert (tmp_path / "plot.png").stat().st_size > 0
