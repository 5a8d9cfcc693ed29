"""lm-eval 0.4 integration: model-args parsing, log-likelihoods of the registered model type against a float64 direct
computation (original head, one exit, ACD; ModuleFormer, GPT-2, GPT-Neo), hand-computed metrics on a toy task,
generation against a naive greedy loop, the shipped offline tasks and their data, and the CLI launcher."""
import copy
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from conftest import tiny_config_kwargs
from moduleformer_exit import AutoMultiExitModel, ModuleFormerConfig
from moduleformer_exit import MultiExitConfiguration as MEC
from moduleformer_exit.evaluation import TASKS_DIR, evaluate, register
from moduleformer_exit.evaluation.cli import normalize_flags
from moduleformer_exit.evaluation.model_args import multi_exit_config_from_args

ACD_DATA = Path(__file__).parent / "data" / "acd"
SPECIALS = ["<pad>", "<bos>", "<eos>", "<unk>"]
CHARS = ["\n"] + [chr(c) for c in range(32, 127)]  # ids 4..99: one token per character
MultiExitLM = register()


def char_tokenizer() -> PreTrainedTokenizerFast:
    """100-token character-level tokenizer (specials, newline, printable ASCII), so token counts are by hand."""
    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(SPECIALS + CHARS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("[\\s\\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>",
                                   unk_token="<unk>")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """``{kind: (dir, exits)}``: a tiny multi-exit ModuleFormer saved here, IBM's GPT-2 / GPT-Neo test checkpoints
    copied; each with the character tokenizer."""
    root = tmp_path_factory.mktemp("ckpt")
    torch.manual_seed(0)
    config = ModuleFormerConfig(**tiny_config_kwargs(n_layer=3, vocab_size=101, block_size=24, history_length=16,
                                                   initializer_range=0.2))
    moduleformer = AutoMultiExitModel.from_config(config, MEC(lm_head_layer_indices=(1, 2)))
    moduleformer.save_pretrained(root / "moduleformer")
    for kind in ("gpt2", "gpt_neo", "gpt2_cast"):
        shutil.copytree(ACD_DATA / kind, root / kind)
    tokenizer = char_tokenizer()
    for kind in ("moduleformer", "gpt2", "gpt_neo", "gpt2_cast"):
        tokenizer.save_pretrained(root / kind)
    return {"moduleformer": (str(root / "moduleformer"), (1, 2)), "gpt2": (str(root / "gpt2"), (1, 2, 4)),
            "gpt_neo": (str(root / "gpt_neo"), (2, 3, 4)), "gpt2_cast": (str(root / "gpt2_cast"), (1, 2, 4))}


# ------------------------------------------------------------------------------------------- model-args parsing
@pytest.mark.parametrize("text,expected", [("true", True), ("True", True), ("1", True), (1, True), (True, True),
                                           ("false", False), ("False", False), ("0", False), (0, False)])
def test_boolean_forms(text, expected):
    cfg = multi_exit_config_from_args(use_original_head=text, output_layer_index=None if expected else "2")
    assert cfg.use_original_head is expected


def test_contrast_and_cli_string_forms():
    from lm_eval._cli.utils import key_val_to_dict
    from lm_eval.utils import simple_parse_args_string

    line = "pretrained=x,use_original_head=false,contrast_layer_indices='original;12',alpha=0.2,vocab_projection_mode=2"
    for parse in (key_val_to_dict, simple_parse_args_string):  # the CLI's parser and simple_evaluate's
        args = parse(line)
        args.pop("pretrained")
        cfg = multi_exit_config_from_args(**args)
        assert cfg.contrast_layer_indices == ("original", 12) and cfg.use_original_head is False
        assert cfg.alpha == 0.2 and cfg.vocab_projection_mode.name == "SHARED_PROJECTION_DIRECT"
    assert multi_exit_config_from_args(contrast_layer_indices="12;6").contrast_layer_indices == (12, 6)
    assert multi_exit_config_from_args(contrast_layer_indices=("Original", 3)).contrast_layer_indices == ("original", 3)
    cfg = multi_exit_config_from_args(output_layer_index="3")  # use_original_head inferred False
    assert (cfg.use_original_head, cfg.output_layer_index) == (False, 3)
    assert multi_exit_config_from_args().use_original_head is True
    assert multi_exit_config_from_args(vocab_projection_mode="shared_projection_cast_outputs").vocab_projection_mode.value == 1


@pytest.mark.parametrize("args,match", [
    (dict(use_original_head="yes"), "use_original_head='yes' is not a boolean"),
    (dict(use_original_head=2), "is not a boolean"),
    (dict(contrast_layer_indices="original,12"), "separated by a semicolon"),
    (dict(contrast_layer_indices="original;12;6"), "separated by a semicolon"),
    (dict(contrast_layer_indices="original;top"), "'top' is neither an integer"),
    (dict(output_layer_index="two"), "output_layer_index='two' is not an integer"),
    (dict(output_layer_index=2.5), "is not an integer"),
    (dict(alpha="high", output_layer_index=1), "alpha='high' must be a number"),
    (dict(minimum_candidates=1.5, output_layer_index=1), "minimum_candidates=1.5 must be an integer"),
    (dict(vocab_projection_mode="lens"), "Unknown vocab_projection_mode 'lens'"),
    (dict(use_original_head=True, output_layer_index=2), "use_original_head=True"),
    (dict(output_layer_index=2, contrast_layer_indices="original;1"), "not both"),
    (dict(output_layer_index=0), "count blocks from 1"),
])
def test_bad_model_args(args, match):
    with pytest.raises(ValueError, match=match):
        multi_exit_config_from_args(**args)


def test_cli_flag_normalisation():
    assert normalize_flags(["--model-args", "a=1", "--batch-size=2", "-a", "x", "--tasks", "austen"]) == [
        "--model_args", "a=1", "--batch_size=2", "-a", "x", "--tasks", "austen"]


# ------------------------------------------------------------------------------------------- float64 reference
def reference_log_probs(model, ids: torch.Tensor, mode) -> torch.Tensor:
    """float64 log-probabilities ``[T, V]`` of ``ids`` ``[T]``, written out from the exit definition and ACD's formula
    (``mode``: ``"original"``, an exit layer, or ``(upper, lower, alpha)``)."""
    ref = copy.deepcopy(model).double()
    n = ref.config.num_hidden_layers
    with torch.no_grad():
        hs = ref.backbone(ids[None], output_hidden_states=True, use_cache=False).hidden_states

        def logits(layer):
            if layer == "original":
                return ref.lm_head(hs[n])[0]
            h = hs[layer] if layer == n else ref.backbone.ln_f(hs[layer])
            if hasattr(ref, "name_to_conv_matrix"):  # SHARED_PROJECTION_CAST_OUTPUTS: lm_head(cast_k(ln_f(h_k)))
                return ref.lm_head(ref.name_to_conv_matrix[f"{layer}_to_{n}"](h))[0]
            return ref.name_to_lm_exit_head[f"lm_head_{layer}"](h)[0]

        if not isinstance(mode, tuple):
            return torch.log_softmax(logits(mode), -1)
        upper, lower, alpha = mode
        p_up, p_low = torch.softmax(logits(upper), -1), torch.softmax(logits(lower), -1)
        head = p_up >= alpha * p_up.max(-1, keepdim=True).values
        ratio = torch.where(head, p_up / p_low, torch.zeros_like(p_up))
        acd = torch.where(head, (p_up * head).sum(-1, keepdim=True) * ratio / ratio.sum(-1, keepdim=True), p_up)
        return acd.log()


def reference_loglikelihood(model, tokenizer, context: str, continuation: str, mode) -> float:
    ctx, cont = tokenizer.encode(context), tokenizer.encode(continuation)
    ids = torch.tensor(ctx + cont)
    lp = reference_log_probs(model, ids[:-1], mode)
    return float(sum(lp[len(ctx) - 1 + i, t] for i, t in enumerate(cont)))


def reference_rolling(model, tokenizer, text: str, max_length: int, mode) -> float:
    """Every token predicted once; a window predicts up to ``max_length`` tokens from the ``max_length`` tokens
    (bos first) before its last one."""
    tokens = tokenizer.encode(text)
    seq = [tokenizer.bos_token_id] + tokens
    total, start = 0.0, 0
    while start < len(tokens):
        end = min(start + max_length, len(tokens))
        window = seq[max(0, end - max_length):end]
        lp = reference_log_probs(model, torch.tensor(window), mode)
        offset = len(window) - (end - start)
        total += float(sum(lp[offset + i, tokens[start + i]] for i in range(end - start)))
        start = end
    return total


def mode_args(mode, kind="") -> str:
    if kind == "gpt2_cast":
        return ",vocab_projection_mode=shared_projection_cast_outputs" + mode_args(mode)
    if mode == "original":
        return ""
    if isinstance(mode, tuple):
        upper, lower, alpha = mode
        return f",use_original_head=false,contrast_layer_indices='{upper};{lower}',alpha={alpha}"
    return f",use_original_head=False,output_layer_index={mode}"


MODES = {
    "moduleformer": ["original", 1, ("original", 1, 0.1), (2, 1, 0.3)],
    "gpt2": ["original", 2, ("original", 2, 0.1), (4, 1, 0.1)],
    "gpt_neo": ["original", 3, ("original", 3, 0.1), (4, 2, 0.5)],
    "gpt2_cast": [1, ("original", 2, 0.1)],
}
CASES = [(kind, mode) for kind, modes in MODES.items() for mode in modes]
PAIRS = [("Mr. Darcy", " bowed."), ("It is a truth", " universally"), ("She", " smiled"), ("x", "y")]
LONG = ("It is a truth universally acknowledged, that a single man in possession of a good fortune, "
        "must be in want of a wife.") * 2


@pytest.mark.parametrize("kind,mode", CASES, ids=[f"{k}-{m}" for k, m in CASES])
def test_loglikelihoods_match_direct_computation(checkpoints, kind, mode):
    from lm_eval.api.instance import Instance

    path, _ = checkpoints[kind]
    lm = MultiExitLM.create_from_arg_string(f"pretrained={path}{mode_args(mode, kind)}",
                                            {"batch_size": 3, "device": "cpu"})
    tokenizer = lm.tokenizer
    requests = [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(PAIRS)]
    got = lm.loglikelihood(requests, disable_tqdm=True)
    for (context, continuation), (ll, _) in zip(PAIRS, got):
        n = len(tokenizer.encode(continuation))  # 1e-5 per scored token (float32 model vs float64 reference)
        assert ll == pytest.approx(reference_loglikelihood(lm.model, tokenizer, context, continuation, mode), abs=1e-5 * n)
    n_tokens = len(tokenizer.encode(LONG))
    assert n_tokens > 2 * lm.max_length  # several windows
    rolling = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (LONG,), 0)], disable_tqdm=True)
    reference = reference_rolling(lm.model, tokenizer, LONG, lm.max_length, mode)
    assert rolling[0] / n_tokens == pytest.approx(reference / n_tokens, abs=1e-5)  # 1e-5 per token (float32 sum)


@pytest.mark.parametrize("kind,mode", [("gpt2", ("original", 2, 0.1)), ("gpt_neo", 3), ("moduleformer", "original"),
                                       ("moduleformer", ("original", 1, 0.1))])
def test_generation_matches_naive_greedy_loop(checkpoints, kind, mode):
    from lm_eval.api.instance import Instance

    path, _ = checkpoints[kind]
    lm = MultiExitLM.create_from_arg_string(f"pretrained={path}{mode_args(mode)}", {"batch_size": 2, "device": "cpu"})
    prompts = ["Mr. Darcy said", "She"]
    gen = {"until": ["\n\n\n"], "max_gen_toks": 6, "do_sample": False}
    got = lm.generate_until([Instance("generate_until", {}, (p, gen), i) for i, p in enumerate(prompts)],
                            disable_tqdm=True)
    for prompt, text in zip(prompts, got):
        ids = lm.tokenizer.encode(prompt)
        for _ in range(6):  # no cache: the whole sequence every step
            ids.append(int(reference_log_probs(lm.model, torch.tensor(ids), mode)[-1].argmax()))
        assert text == lm.tokenizer.decode(ids[len(lm.tokenizer.encode(prompt)):], skip_special_tokens=True)


def test_model_object_device_and_context_length(checkpoints):
    path, _ = checkpoints["moduleformer"]
    lm = MultiExitLM.create_from_arg_string(f"pretrained={path}", {"device": "cuda:0"})  # the CLI's default
    assert lm.device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert lm.max_length == 24  # ModuleFormer: block_size (not n_ctx = history_length * n_layer = 48)
    assert MultiExitLM.create_from_arg_string(f"pretrained={path},max_length=16", {}).max_length == 16
    assert MultiExitLM.create_from_arg_string(f"pretrained={checkpoints['gpt2'][0]}", {}).max_length == 64
    model = AutoMultiExitModel.from_pretrained(path, MEC(use_original_head=False, output_layer_index=2))
    as_configured = MultiExitLM(pretrained=model, tokenizer=char_tokenizer())
    assert as_configured.multi_exit_config.get_description() == "layer_2"
    MultiExitLM(pretrained=model, tokenizer=char_tokenizer(), contrast_layer_indices="original;1")
    assert model.multi_exit_config.get_description() == "original_vs_1"
    with pytest.raises(ValueError, match="does not match the exit heads"):
        MultiExitLM.create_from_arg_string(f"pretrained={path},output_layer_index=3", {})
    plain = GPT2LMHeadModel(GPT2Config(vocab_size=100, n_embd=8, n_layer=1, n_head=2, n_positions=32))
    with pytest.raises(ValueError, match="has no exit heads"):
        MultiExitLM(pretrained=plain, tokenizer=char_tokenizer(), output_layer_index=1)


# ------------------------------------------------------------------------------------------- toy task, by hand
def constant_model(original: dict, exits: dict) -> torch.nn.Module:
    """A multi-exit GPT-2 whose outputs ignore the context: ln_f outputs e_0, so logits_v = W[v, 0]; ``original`` and
    ``exits[k]`` map characters to logits (every other token has logit 0)."""
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=100, n_embd=8, n_layer=2, n_head=2, n_positions=32, bos_token_id=1, eos_token_id=2)
    model = AutoMultiExitModel.from_config(config, MEC(lm_head_layer_indices=(1, 2))).eval()
    vocab = char_tokenizer().get_vocab()
    with torch.no_grad():
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.zero_()
        model.transformer.ln_f.bias[0] = 1.0
        for weight, table in [(model.lm_head.weight, original)] + [
                (model.name_to_lm_exit_head[f"lm_head_{k}"].weight, t) for k, t in exits.items()]:
            weight[:, 0] = 0.0
            for char, logit in table.items():
                weight[vocab[char], 0] = logit
    return model


def write_toy_tasks(root: Path) -> None:
    rows = {"toy_ll": [{"context": "x", "target": "a"}, {"context": "xy", "target": "aa"}, {"context": "z", "target": "b"}],
            "toy_ppl": [{"text": "ab ab"}, {"text": "hello"}],
            "toy_gen": [{"context": "x", "target": "aaa"}, {"context": "y", "target": "bbb"}, {"context": "z", "target": "aaa"}]}
    body = {"toy_ll": "output_type: loglikelihood\ndoc_to_text: '{{context}}'\ndoc_to_target: '{{target}}'\n"
                      "target_delimiter: ''\nmetric_list:\n  - {metric: acc}\n  - {metric: perplexity}\n",
            "toy_ppl": "output_type: loglikelihood_rolling\ndoc_to_text: ''\ndoc_to_target: '{{text}}'\nmetric_list:\n"
                       "  - {metric: word_perplexity}\n  - {metric: byte_perplexity}\n  - {metric: bits_per_byte}\n",
            "toy_gen": "output_type: generate_until\ndoc_to_text: '{{context}}'\ndoc_to_target: '{{target}}'\n"
                       "generation_kwargs: {until: ['\\n'], max_gen_toks: 3, do_sample: false}\n"
                       "metric_list:\n  - {metric: exact_match}\n"}
    for name, docs in rows.items():
        (root / f"{name}.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
        (root / f"{name}.yaml").write_text(
            f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {root / (name + '.jsonl')}\n"
            f"test_split: test\n{body[name]}metadata: {{version: 1.0}}\n")


def test_toy_tasks_give_hand_computed_metrics(tmp_path):
    from lm_eval.utils import simple_parse_args_string

    write_toy_tasks(tmp_path)
    model = constant_model({"a": math.log(3)}, {1: {"b": math.log(4)}, 2: {}})
    # original: p(a) = 3/102, others 1/102.  exit 1: p(b) = 4/103, others 1/103.  ACD(original, 1), alpha 0.1:
    # every token is in the head set (1/102 >= 0.1 * 3/102), weights p_up/p_low ~ a: 3, b: 1/4, the other 98: 1.
    z = 3 + 0.25 + 98
    expected = {
        "": {"a": 3 / 102, "b": 1 / 102, "other": 1 / 102, "acc": 2 / 3, "gen": 2 / 3},
        "use_original_head=false,output_layer_index=1": {"a": 1 / 103, "b": 4 / 103, "other": 1 / 103, "acc": 1 / 3,
                                                         "gen": 1 / 3},
        "use_original_head=false,contrast_layer_indices='original;1'": {"a": 3 / z, "b": 0.25 / z, "other": 1 / z,
                                                                        "acc": 2 / 3, "gen": 2 / 3},
    }
    for model_args, p in expected.items():
        args = {"tokenizer": char_tokenizer(), **simple_parse_args_string(model_args)}
        out = evaluate(model, ["toy_ll", "toy_ppl", "toy_gen"], args, include_path=tmp_path, include_defaults=False,
                       bootstrap_iters=0)
        res = out["results"]
        ll = [math.log(p["a"]), 2 * math.log(p["a"]), math.log(p["b"])]
        assert res["toy_ll"]["acc,none"] == pytest.approx(p["acc"])
        assert res["toy_ll"]["perplexity,none"] == pytest.approx(math.exp(-sum(ll) / 3), rel=1e-6)
        # "ab ab": a, b, ' ', a, b; "hello": 5 other characters. 3 words, 10 bytes.
        total = 2 * math.log(p["a"]) + 2 * math.log(p["b"]) + 6 * math.log(p["other"])
        assert res["toy_ppl"]["word_perplexity,none"] == pytest.approx(math.exp(-total / 3), rel=1e-6)
        assert res["toy_ppl"]["byte_perplexity,none"] == pytest.approx(math.exp(-total / 10), rel=1e-6)
        assert res["toy_ppl"]["bits_per_byte,none"] == pytest.approx(-total / 10 / math.log(2), rel=1e-6)
        assert res["toy_gen"]["exact_match,none"] == pytest.approx(p["gen"])


# ------------------------------------------------------------------------------------------- shipped tasks + CLI
SHIPPED = ("austen_heldout_ppl", "austen_lastword", "austen_lastword_gen")


def test_shipped_tasks_run_end_to_end(checkpoints):
    path, _ = checkpoints["moduleformer"]
    out = evaluate(path, ["austen"], "contrast_layer_indices='original;1'", limit=3, include_defaults=False,
                   bootstrap_iters=0, log_samples=True)
    assert set(SHIPPED) <= set(out["results"])
    for task in SHIPPED:
        assert len(out["samples"][task]) == 3
    ppl = out["results"]["austen_heldout_ppl"]
    texts = [s["doc"]["text"] for s in out["samples"]["austen_heldout_ppl"]]
    total = sum(s["filtered_resps"][0] for s in out["samples"]["austen_heldout_ppl"])
    assert ppl["byte_perplexity,none"] == pytest.approx(math.exp(-total / sum(len(t.encode()) for t in texts)))
    assert 0 <= out["results"]["austen_lastword"]["acc,none"] <= 1
    assert out["config"]["model_args"]["contrast_layer_indices"] == "original;1"


def test_shipped_task_data_is_the_quickstart_heldout_split(tmp_path):
    from moduleformer_exit.evaluation import task_data
    from moduleformer_exit.training.data import bundled_corpus_files, load_corpus, split_documents

    counts = task_data.build(tmp_path)
    for name in (task_data.HELDOUT_FILE, task_data.LASTWORD_FILE):  # deterministic: rebuilt == shipped
        assert (tmp_path / name).read_bytes() == (TASKS_DIR / name).read_bytes()
    train, heldout = split_documents(load_corpus(bundled_corpus_files()), 0.05, seed=1234)  # quickstart's split
    shipped = [json.loads(line)["text"] for line in (TASKS_DIR / task_data.HELDOUT_FILE).read_text().splitlines()]
    seen = set(train["text"])
    assert shipped == [t for t in heldout["text"] if t not in seen] and counts[task_data.HELDOUT_FILE] == len(shipped)
    assert len(shipped) > 100
    rows = [json.loads(line) for line in (TASKS_DIR / task_data.LASTWORD_FILE).read_text().splitlines()]
    assert len(rows) > 50
    for row in rows:
        assert row["text"].startswith(row["context"] + " " + row["target"]) and row["target"].isalpha()
        assert row["text"][len(row["context"]) + 1 + len(row["target"]):].strip(".,;:!?\"'-_)") == ""
    assert sum(f.stat().st_size for f in TASKS_DIR.iterdir()) < 300_000


def test_cli_runs_lm_evals_own_command(checkpoints, tmp_path, monkeypatch, capsys):
    import lm_eval.tasks

    from moduleformer_exit.cli import main

    # Only to keep the test fast: skip indexing lm-eval's ~15k built-in task files (the launcher is unchanged).
    init = lm_eval.tasks.TaskManager.__init__
    monkeypatch.setattr(lm_eval.tasks.TaskManager, "__init__",
                        lambda self, *a, **k: init(self, *a, **{**k, "include_defaults": False}))
    path, _ = checkpoints["gpt2"]
    assert main(["eval", "--tasks", "austen_lastword", "--model-args",
                 f"pretrained={path},use_original_head=false,contrast_layer_indices='original;2'", "--limit", "2",
                 "--output_path", str(tmp_path)]) == 0
    table = capsys.readouterr().out
    assert "moduleformer-exit" in table and "austen_lastword" in table and "acc" in table
    result = json.loads(next(tmp_path.rglob("results_*.json")).read_text())
    assert result["config"]["model"] == "moduleformer-exit"
    assert result["config"]["model_args"]["contrast_layer_indices"] == "original;2"
    with pytest.raises(SystemExit):  # lm-eval's own error for a comma inside the pair
        main(["eval", "--tasks", "austen_lastword", "--model_args", f"pretrained={path},contrast_layer_indices=original,2"])


def test_python_dash_m_entry_point(monkeypatch, capsys):
    import runpy
    import sys

    monkeypatch.setattr(sys, "argv", ["python -m moduleformer_exit.eval", "run", "--help"])
    with pytest.raises(SystemExit) as done:
        runpy.run_module("moduleformer_exit.eval", run_name="__main__")
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert "--model_args" in out and "--include_path" in out
