"""The ``moduleformer-exit`` command line: ``generate`` (plain, exit, ACD) streams what ``generate()`` produces,
and ``bench --quick`` prints its tables."""
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from conftest import tiny_config_kwargs
from moduleformer_exit import AutoMultiExitModel, ModuleFormerConfig, MultiExitConfiguration
from moduleformer_exit.cli import main

TEXT = ["It is a truth universally acknowledged, that a single man in possession of a good fortune, "
        "must be in want of a wife."] * 20


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("cli-model")
    raw = Tokenizer(models.BPE(unk_token=None))
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    raw.train_from_iterator(TEXT, trainers.BpeTrainer(vocab_size=300, special_tokens=["<|pad|>", "<|eos|>"],
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=raw, pad_token="<|pad|>", eos_token="<|eos|>")
    tokenizer.save_pretrained(directory)
    torch.manual_seed(0)
    config = ModuleFormerConfig(**tiny_config_kwargs(n_layer=3, vocab_size=len(tokenizer), pad_token_id=0,
                                                     eos_token_id=1, bos_token_id=1))
    AutoMultiExitModel.from_config(config, MultiExitConfiguration(lm_head_layer_indices=(1, 3))).save_pretrained(directory)
    return directory, tokenizer


@pytest.mark.parametrize("flags, runtime", [
    ([], MultiExitConfiguration()),
    (["--exit", "1"], MultiExitConfiguration(use_original_head=False, output_layer_index=1)),
    (["--contrast", "original,1"], MultiExitConfiguration(use_original_head=False,
                                                          contrast_layer_indices=("original", 1))),
])
def test_generate_streams_the_same_tokens_as_generate(model_dir, capsys, flags, runtime):
    directory, tokenizer = model_dir
    assert main(["generate", "--model", str(directory), "--max-new-tokens", "6", *flags, "a single man"]) == 0
    printed = capsys.readouterr().out
    model = AutoMultiExitModel.from_pretrained(directory, runtime).eval()
    prompt = tokenizer("a single man", return_tensors="pt")
    tokens = model.generate(**prompt, max_new_tokens=6, do_sample=False, pad_token_id=0)
    expected = tokenizer.decode(tokens[0], skip_special_tokens=True)
    assert printed.strip() == expected.strip()


def test_generate_rejects_bad_contrast(model_dir):
    directory, _ = model_dir
    with pytest.raises(SystemExit, match="two layers"):
        main(["generate", "--model", str(directory), "--contrast", "3", "hi"])
    with pytest.raises(SystemExit, match="does not match the exit heads"):  # a message, not a traceback
        main(["generate", "--model", str(directory), "--exit", "2", "hi"])


def test_bench_quick_prints_tables(capsys, tmp_path):
    out_json = tmp_path / "bench.json"
    assert main(["bench", "--quick", "--json", str(out_json)]) == 0
    printed = capsys.readouterr().out
    for title in ("MoE MLP layer", "Stick-breaking attention", "Greedy decode", "ACD greedy decode"):
        assert title in printed
    assert out_json.exists()


def test_generate_errors_name_the_problem(model_dir, tmp_path, capsys):
    # issue #10 item 11: missing directory, missing tokenizer, empty prompt, non-numeric contrast, beam search
    directory, tokenizer = model_dir
    with pytest.raises(SystemExit, match="no such directory"):
        main(["generate", "--model", str(tmp_path / "nope"), "hi"])
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "config.json").write_text((directory / "config.json").read_text())
    with pytest.raises(SystemExit, match="no tokenizer"):
        main(["generate", "--model", str(bare), "hi"])
    with pytest.raises(SystemExit, match="prompt is empty"):
        main(["generate", "--model", str(directory), ""])
    with pytest.raises(SystemExit, match="'original' or layer numbers"):
        main(["generate", "--model", str(directory), "--contrast", "original,x", "hi"])
    assert main(["generate", "--model", str(directory), "--num-beams", "3", "--max-new-tokens", "4",
                 "a single man"]) == 0
    model = AutoMultiExitModel.from_pretrained(directory).eval()
    prompt = tokenizer("a single man", return_tensors="pt")
    tokens = model.generate(**prompt, max_new_tokens=4, num_beams=3, do_sample=False, pad_token_id=0)
    assert capsys.readouterr().out.strip() == tokenizer.decode(tokens[0], skip_special_tokens=True).strip()
