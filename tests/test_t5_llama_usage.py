"""T5 and Llama through the user-facing paths: ``generate`` (CLI), ``train-exits``, lm-eval's model type, cast-matrix
fitting and freezing, each against an independent reference (plain transformers modules, float64, naive loops)."""
import copy

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, T5Config, T5ForConditionalGeneration

from moduleformer_exit import AutoMultiExitModel, fit_cast_matrices
from moduleformer_exit import MultiExitConfiguration as MEC
from moduleformer_exit.cli import main

TEXT = ["It is a truth universally acknowledged, that a single man in possession of a good fortune, "
        "must be in want of a wife."] * 20


def tokenizer():
    raw = Tokenizer(models.BPE(unk_token=None))
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    raw.train_from_iterator(TEXT, trainers.BpeTrainer(vocab_size=300, special_tokens=["<|pad|>", "<|eos|>"],
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=raw, pad_token="<|pad|>", eos_token="<|eos|>")


def tiny_config(kind, vocab):
    if kind == "t5":  # the decoder deeper than the encoder: generate() must size its cache by the decoder
        return T5Config(vocab_size=vocab, d_model=16, d_kv=8, d_ff=32, num_layers=2, num_decoder_layers=3,
                        num_heads=2, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1, initializer_factor=2.0)
    return LlamaConfig(vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=3,
                       num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128, pad_token_id=0,
                       bos_token_id=1, eos_token_id=1, initializer_range=0.2)


@pytest.fixture(scope="module", params=["t5", "llama"])
def checkpoint(request, tmp_path_factory):
    directory = tmp_path_factory.mktemp(request.param)
    tok = tokenizer()
    tok.save_pretrained(directory)
    torch.manual_seed(0)
    model = AutoMultiExitModel.from_config(tiny_config(request.param, len(tok)), MEC(lm_head_layer_indices=(1, 3)))
    with torch.no_grad():  # non-unit norms: a norm applied twice or skipped shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.3 * torch.randn_like(p))
    model.save_pretrained(directory)
    return request.param, directory, tok


def reference_logits(model, kind, input_ids, decoder_input_ids=None, layer="original"):
    """float64 logits ``[B, T, V]`` of ``layer`` written out from plain transformers modules (exit definition:
    head_k(norm(h_k)) below the top, times d_model**-0.5 for tied T5)."""
    if kind == "t5":
        plain = T5ForConditionalGeneration(model.config)
    else:
        plain = LlamaForCausalLM(model.config)
    plain.load_state_dict(model.state_dict(), strict=False)
    plain = plain.double().eval()
    heads = copy.deepcopy(model.name_to_lm_exit_head).double()
    with torch.no_grad():
        if kind == "t5":
            out = plain(input_ids, decoder_input_ids=decoder_input_ids, output_hidden_states=True, use_cache=False)
            hs, norm, scale = out.decoder_hidden_states, plain.decoder.final_layer_norm, model.config.d_model ** -0.5
        else:
            hs = plain(input_ids, output_hidden_states=True, use_cache=False).hidden_states
            norm, scale = plain.model.norm, 1.0
        top = len(hs) - 1
        if layer == "original":
            return plain.lm_head(hs[top] * scale)
        h = hs[layer] if layer == top else norm(hs[layer])
        return heads[f"lm_head_{layer}"](h * scale)


def test_generate_command_decodes_an_exit(checkpoint, capsys):
    """``generate --exit 1`` prints the greedy continuation of exit 1, checked with a naive uncached loop."""
    kind, directory, tok = checkpoint
    model = AutoMultiExitModel.from_pretrained(directory).eval()
    assert main(["generate", "a single man", "--model", str(directory), "--exit", "1", "--max-new-tokens", "5"]) == 0
    printed = capsys.readouterr().out.strip()
    prompt = tok("a single man", return_tensors="pt").input_ids
    ids = torch.zeros(1, 1, dtype=torch.long) if kind == "t5" else prompt
    for _ in range(5):
        logits = reference_logits(model, kind, prompt, ids, layer=1) if kind == "t5" else \
            reference_logits(model, kind, ids, layer=1)
        ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], 1)
    new = ids[0, 1:] if kind == "t5" else ids[0, prompt.shape[1]:]
    expected = tok.decode(new, skip_special_tokens=True)
    if kind == "llama":
        expected = tok.decode(ids[0], skip_special_tokens=True)
    assert printed == expected.strip()


def test_forward_and_loss_match_float64_reference(checkpoint):
    kind, directory, _ = checkpoint
    model = AutoMultiExitModel.from_pretrained(directory).eval()
    torch.manual_seed(1)
    x, y = torch.randint(2, 300, (2, 7)), torch.randint(2, 300, (2, 5))
    dec = model._shift_right(y) if kind == "t5" else None
    with torch.no_grad():
        out = model(input_ids=x, labels=y) if kind == "t5" else model(input_ids=x, labels=x)
    for layer in ("original", 1, 3):
        ref = reference_logits(model, kind, x, dec, layer)
        model.set_multi_exit_config(MEC() if layer == "original" else MEC(use_original_head=False,
                                                                           output_layer_index=layer))
        with torch.no_grad():
            got = model(input_ids=x, decoder_input_ids=dec).logits if kind == "t5" else model(x).logits
        torch.testing.assert_close(got.double(), ref, atol=1e-5, rtol=1e-5)
    # loss = sum of the exits' CEs (T5 unshifted against the labels; Llama shifted), original head excluded
    ce = torch.nn.functional.cross_entropy
    if kind == "t5":
        parts = [ce(reference_logits(model, kind, x, dec, k).flatten(0, 1), y.flatten()) for k in (1, 3)]
    else:
        parts = [ce(reference_logits(model, kind, x, None, k)[:, :-1].flatten(0, 1), x[:, 1:].flatten())
                 for k in (1, 3)]
    assert out.loss.item() == pytest.approx(float(sum(parts)), rel=1e-5)


def test_train_exits_trains_only_the_heads_and_reloads(checkpoint, tmp_path):
    from moduleformer_exit.training.exits import train_exits

    kind, directory, _ = checkpoint
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(TEXT * 3))
    res = train_exits(str(directory), [2], str(corpus), str(tmp_path / "out"), steps=12, lr=2e-2, batch_size=4,
                      block_size=16, max_heldout_blocks=8, init="random")
    assert set(res["before"]) == {"final", "exit1", "exit2", "exit3"}
    assert res["before"]["final"] == pytest.approx(res["after"]["final"])  # base frozen
    assert res["after"]["exit2"] < res["before"]["exit2"]
    reloaded = AutoMultiExitModel.from_pretrained(str(tmp_path / "out"))
    assert reloaded.exit_layers == [1, 2, 3]


def test_lm_eval_loglikelihood_matches_reference(checkpoint):
    """lm-eval scores T5 continuations as decoder targets of the context (seq2seq backend), Llama causally."""
    from lm_eval.api.instance import Instance

    from moduleformer_exit.evaluation.lm_eval_model import MultiExitLM

    kind, directory, tok = checkpoint
    lm = MultiExitLM.create_from_arg_string(f"pretrained={directory},use_original_head=False,output_layer_index=1",
                                            {"batch_size": 2, "device": "cpu"})
    assert lm.backend == ("seq2seq" if kind == "t5" else "causal")
    pairs = [("a single man", " in possession"), ("It is", " a truth")]
    got = lm.loglikelihood([Instance("loglikelihood", {}, p, i) for i, p in enumerate(pairs)], disable_tqdm=True)
    for (context, continuation), (ll, _) in zip(pairs, got):
        ctx, cont = torch.tensor([tok.encode(context)]), torch.tensor([tok.encode(continuation)])
        if kind == "t5":
            dec = torch.cat([torch.zeros(1, 1, dtype=torch.long), cont[:, :-1]], 1)
            lp = torch.log_softmax(reference_logits(lm.model, kind, ctx, dec, layer=1), -1)[0]
            expected = float(lp[torch.arange(cont.shape[1]), cont[0]].sum())
        else:
            ids = torch.cat([ctx, cont], 1)
            lp = torch.log_softmax(reference_logits(lm.model, kind, ids[:, :-1], layer=1), -1)[0]
            expected = float(sum(lp[ctx.shape[1] - 1 + i, t] for i, t in enumerate(cont[0].tolist())))
        assert ll == pytest.approx(expected, abs=1e-5 * cont.shape[1])


def test_cast_matrices_fit_by_least_squares(checkpoint):
    """T5: the encoder reads the text, the decoder is teacher-forced on it; W solves norm(h_k) W ~= h_L."""
    kind, directory, _ = checkpoint
    model = AutoMultiExitModel.from_pretrained(
        directory, MEC(vocab_projection_mode="SHARED_PROJECTION_CAST_OUTPUTS", use_original_head=False,
                       output_layer_index=1)).eval()
    torch.manual_seed(2)
    batches = [torch.randint(2, 300, (4, 12)) for _ in range(3)]
    fit_cast_matrices(model, batches)
    xs, ys = [], []
    for x in batches:
        dec = model._shift_right(x) if kind == "t5" else None
        if kind == "t5":
            plain = T5ForConditionalGeneration(model.config)
            plain.load_state_dict(model.state_dict(), strict=False)
            hs = plain.double().eval()(x, decoder_input_ids=dec, output_hidden_states=True).decoder_hidden_states
            norm = plain.decoder.final_layer_norm
        else:
            plain = LlamaForCausalLM(model.config)
            plain.load_state_dict(model.state_dict(), strict=False)
            hs = plain.double().eval()(x, output_hidden_states=True).hidden_states
            norm = plain.model.norm
        xs.append(norm(hs[1]).detach().flatten(0, 1))
        ys.append(hs[3].detach().flatten(0, 1))
    solution = torch.linalg.lstsq(torch.cat(xs), torch.cat(ys)).solution
    torch.testing.assert_close(model.name_to_conv_matrix["1_to_3"].weight.double(), solution.T, atol=1e-4,
                               rtol=1e-3)


def test_generate_command_self_speculative_prints_plain_greedy(checkpoint, capsys):
    """``generate --self-speculative 1`` (lossless) prints what plain ``generate`` prints."""
    kind, directory, _ = checkpoint
    assert main(["generate", "a single man", "--model", str(directory), "--max-new-tokens", "6"]) == 0
    plain = capsys.readouterr().out.strip()
    assert main(["generate", "a single man", "--model", str(directory), "--max-new-tokens", "6",
                 "--self-speculative", "1", "--gamma", "2"]) == 0
    captured = capsys.readouterr()
    assert captured.out.strip() == plain and "[self_speculative]" in captured.err


def test_forward_takes_the_cache_under_both_names_and_refuses_unknown_kwargs(checkpoint):
    from transformers.cache_utils import DynamicCache, EncoderDecoderCache

    kind, directory, _ = checkpoint
    model = AutoMultiExitModel.from_pretrained(directory).eval()
    x = torch.randint(2, 300, (1, 5))
    step = {"decoder_input_ids": torch.zeros(1, 1, dtype=torch.long)} if kind == "t5" else {}
    first = (lambda: dict(input_ids=x, **step)) if kind == "t5" else (lambda: dict(input_ids=x))
    new_cache = ((lambda: model.new_decoder_cache()) if kind == "t5"
                 else (lambda: DynamicCache(config=model.config)))
    with torch.no_grad():
        logits = {}
        for name in ("cache", "past_key_values"):
            cache = new_cache()
            model(**first(), use_cache=True, **{name: cache})
            nxt = dict(input_ids=x, decoder_input_ids=torch.ones(1, 1, dtype=torch.long)) if kind == "t5" else \
                dict(input_ids=torch.ones(1, 1, dtype=torch.long))
            logits[name] = model(**nxt, use_cache=True, **{name: cache}).logits
            assert isinstance(cache, EncoderDecoderCache if kind == "t5" else DynamicCache)
            assert cache.get_seq_length() == (2 if kind == "t5" else 6)
        torch.testing.assert_close(logits["cache"], logits["past_key_values"])
        full = (model(input_ids=x, decoder_input_ids=torch.tensor([[0, 1]])).logits if kind == "t5"
                else model(torch.cat([x, torch.ones(1, 1, dtype=torch.long)], 1)).logits)
        torch.testing.assert_close(logits["cache"], full[:, -1:], atol=1e-5, rtol=1e-5)  # = the uncached forward
        with pytest.raises(TypeError, match="no_such_option"):
            model(**first(), no_such_option=1)


def test_generate_command_on_a_plain_t5_with_a_deeper_decoder(tmp_path, capsys):
    """A plain T5 checkpoint (no exits) whose decoder is deeper than its encoder: transformers 5.23 / 5.24's own
    generate() raises IndexError there; the command decodes it, checked with a naive uncached greedy loop."""
    tok = tokenizer()
    tok.save_pretrained(tmp_path)
    torch.manual_seed(3)
    plain = T5ForConditionalGeneration(tiny_config("t5", len(tok))).eval()
    plain.save_pretrained(tmp_path)
    assert main(["generate", "a single man", "--model", str(tmp_path), "--max-new-tokens", "5"]) == 0
    prompt = tok("a single man", return_tensors="pt").input_ids
    ids = torch.zeros(1, 1, dtype=torch.long)
    with torch.no_grad():
        for _ in range(5):
            logits = plain(prompt, decoder_input_ids=ids, use_cache=False).logits
            ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], 1)
    printed = capsys.readouterr().out.strip().splitlines()[-1]  # (a first import may log a line before the text)
    assert printed == tok.decode(ids[0, 1:], skip_special_tokens=True).strip()
