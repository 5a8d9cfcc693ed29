"""Run-directory reliability without DeepSpeed processes (issue #10): every phase of a checkpoint save killed
(including a ``--no-resume`` restart re-saving the step ``latest`` names), ``latest`` validation, weights-only resume
(a planted pickle never runs), changed recipes refused with the differences, atomic tokenizer save, data-file
checks, the rendezvous timeout, offline defaults, weight-decay groups, ``exits.loss_weight`` and RNG restore."""
import json
import os
import pickle
import random

import pytest
import torch

from moduleformer_exit.training import checkpoint as ckpt
from moduleformer_exit.training import run_dir
from moduleformer_exit.training.recipe import RecipeError, load_recipe

CORPUS = os.path.join(os.path.dirname(__file__), "..", "moduleformer_exit", "data", "austen")


class Killed(BaseException):
    """Stands in for SIGKILL: nothing after the raise runs (BaseException: no ``except Exception`` catches it)."""


class FakeDist:
    def get_rank(self):
        return 0

    def barrier(self):
        pass


class FakeEngine:
    """Writes a DeepSpeed-like tag directory holding ``payload``; ``die_midway`` kills after the first file."""

    def __init__(self, payload, die_midway=False):
        self.payload, self.die_midway = payload, die_midway

    def save_checkpoint(self, save_dir, tag, client_state, save_latest):
        assert save_latest is False
        d = os.path.join(save_dir, tag)
        os.makedirs(d, exist_ok=True)
        torch.save({"payload": torch.tensor(self.payload), **client_state}, os.path.join(d, "model.pt"))
        if self.die_midway:
            raise Killed
        torch.save({"optim": torch.zeros(2)}, os.path.join(d, "optim.pt"))


def _save(ckpt_dir, step, payload, **kw):
    return ckpt.save_checkpoint(FakeEngine(payload, **kw), str(ckpt_dir), step, step * 8, 2, FakeDist(), "{}")


def _resumable(ckpt_dir):
    """What a rerun sees after recovery: (tag, payload), checking the named checkpoint is complete."""
    ckpt.recover(str(ckpt_dir))
    tag = ckpt.read_pointer(str(ckpt_dir))
    files = sorted(os.listdir(ckpt_dir / tag))
    assert files == ["model.pt", "optim.pt", "rng_rank0.pt", "run.json"], files
    assert not [d for d in os.listdir(ckpt_dir) if d.endswith((".tmp", ".old"))]
    return tag, int(torch.load(ckpt_dir / tag / "model.pt", weights_only=True)["payload"])


def _kill_at(monkeypatch, phase):
    """Make the save die at ``phase`` (the same phases as tests/helpers/kill_pretrain.py)."""
    def after(name):
        inner = getattr(ckpt, name)

        def wrapped(*a, **k):
            inner(*a, **k)
            raise Killed
        monkeypatch.setattr(ckpt, name, wrapped)

    if phase == "before_staging":
        monkeypatch.setattr(ckpt, "write_staging", lambda *a, **k: (_ for _ in ()).throw(Killed))
    elif phase in ("after_staging", "after_swap", "after_pointer"):
        after({"after_staging": "write_staging", "after_swap": "replace_dir",
               "after_pointer": "write_pointer_atomically"}[phase])
    elif phase == "between_renames":
        real = os.rename

        def rename(src, dst):
            real(src, dst)
            if str(dst).endswith(ckpt.OLD):
                raise Killed
        monkeypatch.setattr(ckpt.os, "rename", rename)


PHASES = ["inside_deepspeed_write", "before_staging", "after_staging", "between_renames", "after_swap",
          "after_pointer"]


@pytest.mark.parametrize("phase", PHASES)
def test_no_resume_restart_killed_at_every_phase_leaves_a_resumable_run(tmp_path, monkeypatch, phase):
    ckpt_dir = tmp_path / "checkpoints"
    _save(ckpt_dir, 3, payload=1)  # the old run's last checkpoint: latest -> step_3
    assert _resumable(ckpt_dir) == ("step_3", 1)
    _kill_at(monkeypatch, phase)
    with pytest.raises(Killed):  # the --no-resume restart re-saves step_3, the one latest names
        _save(ckpt_dir, 3, payload=2, die_midway=phase == "inside_deepspeed_write")
    monkeypatch.undo()
    tag, payload = _resumable(ckpt_dir)
    assert tag == "step_3"
    assert payload == (2 if phase in ("after_swap", "after_pointer") else 1)  # old or new, always whole


@pytest.mark.parametrize("phase", PHASES)
def test_kill_in_a_new_steps_save_keeps_the_last_good(tmp_path, monkeypatch, phase):
    ckpt_dir = tmp_path / "checkpoints"
    _save(ckpt_dir, 3, payload=1)
    _kill_at(monkeypatch, phase)
    killed = False
    try:
        _save(ckpt_dir, 6, payload=2, die_midway=phase == "inside_deepspeed_write")
    except Killed:
        killed = True
    monkeypatch.undo()
    assert killed == (phase != "between_renames")  # a new step has no old directory to move aside
    assert _resumable(ckpt_dir) == (("step_3", 1) if killed and phase != "after_pointer" else ("step_6", 2))
    _save(ckpt_dir, 6, payload=3)  # the rerun's save of the same step succeeds
    assert _resumable(ckpt_dir) == ("step_6", 3)


@pytest.mark.parametrize("content", ["../../other_run/checkpoints/step_6", "/abs/step_6", "step_6/../step_3",
                                     "step_x", "", "latest"])
def test_latest_must_be_a_plain_step_name(tmp_path, content):
    ckpt_dir = tmp_path / "run" / "checkpoints"
    (tmp_path / "other_run" / "checkpoints" / "step_6").mkdir(parents=True)
    (ckpt_dir / "step_3").mkdir(parents=True)
    (ckpt_dir / "latest").write_text(content)
    with pytest.raises(ckpt.CheckpointError, match="only a plain step_<N>"):
        ckpt.read_pointer(str(ckpt_dir))


def test_latest_naming_a_deleted_checkpoint_is_an_error_not_a_fresh_start(tmp_path):
    ckpt_dir = tmp_path / "checkpoints"
    (ckpt_dir / "step_3").mkdir(parents=True)
    (ckpt_dir / "latest").write_text("step_6")
    with pytest.raises(ckpt.CheckpointError, match=r"names step_6.*does not exist.*step_3.*--no-resume"):
        ckpt.read_pointer(str(ckpt_dir))


def test_planted_pickle_is_refused_without_running(tmp_path):
    pytest.importorskip("deepspeed")
    from types import SimpleNamespace

    from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine

    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    planted = tmp_path / "mp_rank_00_model_states.pt"
    with open(planted, "wb") as f:
        pickle.dump({"module": Evil()}, f)
    engine = SimpleNamespace(checkpoint_engine=TorchCheckpointEngine(), _config=None)
    ckpt.install_safe_loader(engine)  # what load_checkpoint does before DeepSpeed reads a file
    with pytest.raises(ckpt.CheckpointError, match="Refusing to load .*mp_rank_00_model_states.pt"):
        engine.checkpoint_engine.load(str(planted))
    assert not marker.exists()
    # ... while DeepSpeed's own types load: a ZeRO optimizer state holds a LossScaler and a ZeroStageEnum
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    good = tmp_path / "optim.pt"
    torch.save({"loss_scaler": LossScaler(1.0), "zero_stage": ZeroStageEnum.gradients, "w": torch.ones(2)}, good)
    loaded = engine.checkpoint_engine.load(str(good))
    assert loaded["zero_stage"] is ZeroStageEnum.gradients and loaded["loss_scaler"].cur_scale == 1.0


class RngEngine:
    """Stands in for a DeepSpeed engine whose load puts back the client state."""

    checkpoint_engine = None
    _config = None

    def load_checkpoint(self, load_dir, tag):
        return os.path.join(load_dir, tag), {"step": 3, "position": 24}


def test_resume_restores_every_rng(tmp_path, monkeypatch):
    pytest.importorskip("deepspeed")
    import numpy as np

    tag_dir = tmp_path / "step_3"
    tag_dir.mkdir()
    torch.manual_seed(5), random.seed(5), np.random.seed(5)
    torch.save(ckpt.rng_state(), tag_dir / "rng_rank0.pt")
    expected = (torch.rand(3), random.random(), np.random.rand())  # what the uninterrupted run draws next
    torch.manual_seed(99), random.seed(99), np.random.seed(99)
    monkeypatch.setattr(ckpt, "install_safe_loader", lambda engine: None)
    assert ckpt.load_checkpoint(RngEngine(), str(tmp_path), "step_3", 0) == {"step": 3, "position": 24}
    got = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(got[0], expected[0]) and got[1:] == expected[1:]


@pytest.mark.parametrize("name", ["../../../somewhere", "/tmp/abs", "a/b", "..", ""])
def test_recipe_name_is_not_a_path(name):
    with pytest.raises(RecipeError, match="name must be a plain run name"):
        load_recipe("tiny", [f"name={json.dumps(name)}"])


# ----------------------------------------------------------------------------------------------- changed recipes
def _fake_run(tmp_path, recipe):
    """A run directory whose latest checkpoint was trained with ``recipe`` (run.json only: no DeepSpeed needed)."""
    from moduleformer_exit.training.data import resolve_data_files

    out = tmp_path / "run"
    tok = out / "tokenizer"
    tok.mkdir(parents=True)
    (tok / "tokenizer.json").write_text('{"fake": 1}')
    tag = out / "checkpoints" / "step_3"
    tag.mkdir(parents=True)
    info = run_dir.run_info(recipe, resolve_data_files(recipe["data"]["files"]), str(tok))
    (tag / "run.json").write_text(json.dumps(info))
    (out / "checkpoints" / "latest").write_text("step_3")
    (out / "recipe.json").write_text(json.dumps(recipe))
    return out


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text(open(os.path.join(CORPUS, "persuasion.txt"), encoding="utf-8").read()[:20000], encoding="utf-8")
    return str(path)


def test_changed_recipe_is_refused_listing_the_differences(tmp_path, corpus, capsys):
    from moduleformer_exit.training import pretrain

    sets = [f"data.files={json.dumps([corpus])}"]
    out = _fake_run(tmp_path, load_recipe("tiny", sets))
    before = (out / "recipe.json").read_bytes()
    rc = pretrain.main(["tiny", "--output-dir", str(out), "--set", sets[0], "--set", "training.lr=0.01",
                        "--set", "data.block_size=16", "--set", "model.n_embd=48"])
    err = capsys.readouterr().err
    assert rc == 2
    for line in ("training.lr: 0.003 -> 0.01", "data.block_size: 32 -> 16", "model.n_embd: 32 -> 48"):
        assert line in err, err
    assert "--no-resume" in err and "step_3" in err
    assert (out / "recipe.json").read_bytes() == before  # nothing overwritten before the check


def test_safe_changes_resume_and_data_or_tokenizer_changes_do_not(tmp_path, corpus):
    from moduleformer_exit.training.pretrain import preflight

    recipe = load_recipe("tiny", [f"data.files={json.dumps([corpus])}"])
    out = _fake_run(tmp_path, recipe)
    longer = load_recipe("tiny", [f"data.files={json.dumps([corpus])}", "training.max_steps=50",
                                  "training.eval_interval=7"])
    assert preflight(longer, str(out), resume=True) == "step_3"
    assert preflight(recipe, str(out), resume=False) is None
    with open(corpus, "a", encoding="utf-8") as f:
        f.write("\n\nA new paragraph.")
    with pytest.raises(run_dir.RunMismatchError, match="data files changed: corpus.txt"):
        preflight(recipe, str(out), resume=True)
    out2 = _fake_run(tmp_path / "b", load_recipe("tiny", [f"data.files={json.dumps([corpus])}"]))
    (out2 / "tokenizer" / "tokenizer.json").write_text('{"other": 2}')
    with pytest.raises(run_dir.RunMismatchError, match="tokenizer"):
        preflight(recipe, str(out2), resume=True)


def test_tokenizer_save_is_atomic(tmp_path, monkeypatch):
    from transformers import AutoTokenizer

    from moduleformer_exit.training.data import train_tokenizer

    tok = train_tokenizer(["some words here and there"] * 20, vocab_size=300)
    target = str(tmp_path / "tokenizer")
    run_dir.save_tokenizer_atomically(tok, target)
    real = os.rename

    def rename(src, dst):  # killed after moving the old tokenizer aside
        real(src, dst)
        raise Killed
    monkeypatch.setattr(ckpt.os, "rename", rename)
    with pytest.raises(Killed):
        run_dir.save_tokenizer_atomically(tok, target)
    monkeypatch.undo()
    assert not os.path.isdir(target)
    run_dir.recover_dir(target)  # what preflight does before a resume
    assert len(AutoTokenizer.from_pretrained(target)) == len(tok)


# ----------------------------------------------------------------------------------------------- data files
@pytest.mark.parametrize("content,fmt,message", [
    (b"", "text", "is empty"), (b" \n\t\n  ", "text", "only whitespace"),
    (b"abc\x00\x01\x02", "text", "looks binary"), (b"caf\xe9 au lait", "text", "not valid UTF-8"),
    (b"plain text, not json\n", "json", "not JSON lines"), (b"text", "parquet", "not a parquet file"),
])
def test_bad_data_files_are_named_before_work_starts(tmp_path, content, fmt, message):
    path = tmp_path / "bad.txt"
    path.write_bytes(content)
    with pytest.raises(RecipeError, match=rf"{path}.*{message}"):
        load_recipe("tiny", [f"data.files={json.dumps([str(path)])}", f"data.format={json.dumps(fmt)}"])


def test_good_json_lines_pass(tmp_path):
    path = tmp_path / "ok.jsonl"
    path.write_text('{"text": "a"}\n{"text": "b"}\n')
    load_recipe("tiny", [f"data.files={json.dumps([str(path)])}", 'data.format="json"'])


# ----------------------------------------------------------------------------------------------- environment
def test_stale_world_size_fails_fast_naming_the_variables(monkeypatch):
    from moduleformer_exit.training import distributed

    port = distributed._free_port()
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(port))
    monkeypatch.setenv(distributed.RENDEZVOUS_TIMEOUT_ENV, "1")
    import time

    t0 = time.time()
    with pytest.raises(distributed.RendezvousError, match=r"WORLD_SIZE=2 waited 1 s.*unset RANK and WORLD_SIZE"):
        distributed._rendezvous("gloo")
    assert time.time() - t0 < 20
    monkeypatch.delenv("MASTER_PORT")
    before = dict(os.environ)
    with pytest.raises(distributed.RendezvousError, match="MASTER_PORT is not set"):
        distributed.ensure_dist_env()
    assert dict(os.environ) == before  # a failed call sets nothing (a leaked LOCAL_RANK broke later runs)


def test_training_commands_are_offline_by_default(monkeypatch):
    import importlib

    names = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")
    for module in ("pretrain", "finetune", "exits", "quickstart"):
        for var in names:
            monkeypatch.delenv(var, raising=False)
        with pytest.raises(SystemExit):  # --help: set before anything is parsed or loaded
            importlib.import_module(f"moduleformer_exit.training.{module}").main(["--help"])
        assert {v: os.environ.get(v) for v in names} == dict.fromkeys(names, "1"), module


# ----------------------------------------------------------------------------------------------- model + optimizer
def _tiny_recipe(loss_weight):
    return load_recipe("tiny", [f"exits.loss_weight={loss_weight}"])


def test_weight_decay_skips_norms_biases_and_embeddings():
    from torch import nn

    from moduleformer_exit.training.pretrain import build_model, param_groups

    model = build_model(_tiny_recipe(1.0), 300, 0)
    decay, no_decay = param_groups(model, 0.1)
    decay_ids, no_ids = {id(p) for p in decay["params"]}, {id(p) for p in no_decay["params"]}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    expected_no = set()
    for m in model.modules():  # independent classification by module type and parameter name
        for name, p in m.named_parameters(recurse=False):
            if isinstance(m, (nn.LayerNorm, nn.Embedding)) or name == "bias":
                expected_no.add(id(p))
    assert expected_no and expected_no <= no_ids and not expected_no & decay_ids
    linear = {id(m.weight) for m in model.modules() if isinstance(m, nn.Linear)} - expected_no
    assert linear and linear <= decay_ids


@pytest.mark.parametrize("loss_weight", [0.3, 2.0])
def test_exits_loss_weight_scales_the_exit_losses(loss_weight):
    from moduleformer_exit.training.pretrain import build_model, loss_parts

    recipe = _tiny_recipe(loss_weight)
    model = build_model(recipe, 300, 0)
    x = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(0))
    out = model(input_ids=x, labels=x)
    hidden = model.transformer(x, output_hidden_states=True, compute_aux=True)

    def ce(logits):  # float64 shifted cross-entropy, by hand
        logp = logits[:, :-1].double().log_softmax(-1)
        return -logp.gather(-1, x[:, 1:, None]).mean()
    final = ce(model.lm_head(hidden.last_hidden_state))
    exits = [ce(model.exit_logits(hidden.hidden_states, k)) for k in recipe["exits"]["layers"]]
    expected = final + loss_weight * sum(exits) + model.config.aux_loss_weight * hidden.aux_loss.double()
    assert float(out.loss.detach()) == pytest.approx(float(expected.detach()), rel=1e-5)
    parts = loss_parts(out)
    assert float(parts["ce"]) == pytest.approx(float(final), rel=1e-5)


# ----------------------------------------------------------------------------------------------- init_from
def test_init_from_continues_a_trained_run_and_bundled_continuation_recipes_validate(tmp_path, corpus):
    """``training.init_from`` starts from the checkpoint's weights (a near-zero lr keeps them: the continued final
    equals the first run's final, which a fresh init would not); the bundled recipes that continue another run
    (early-exit-8l-layerskip) validate once their input run exists."""
    from safetensors.torch import load_file

    from moduleformer_exit.training import pretrain
    from moduleformer_exit.training.recipe import list_recipes

    data = f"data.files={json.dumps([corpus])}"
    first = tmp_path / "first"
    assert pretrain.main(["tiny", "--output-dir", str(first), "--set", data, "--set", "training.max_steps=2",
                          "--set", "training.warmup_steps=0"]) == 0
    second = tmp_path / "second"
    sets = [data, "model={}", f"training.init_from={json.dumps(str(first / 'final'))}",
            f"data.tokenizer={json.dumps(str(first / 'tokenizer'))}", 'exits.loss="layerskip"',
            "training.max_steps=1", "training.warmup_steps=0", "training.lr=1e-12", "training.weight_decay=0"]
    assert pretrain.main(["tiny", "--output-dir", str(second), *sum((["--set", s] for s in sets), [])]) == 0
    before, after = (load_file(str(d / "final" / "model.safetensors")) for d in (first, second))
    assert before.keys() == after.keys()
    for name in before:
        torch.testing.assert_close(after[name], before[name], atol=1e-6, rtol=0, msg=name)
    continuation = [n for n in list_recipes() if load_recipe_raw(n)["training"].get("init_from")]
    assert "early-exit-8l-layerskip" in continuation
    for name in continuation:
        load_recipe(name, [f"training.init_from={json.dumps(str(first / 'final'))}",
                           f"data.tokenizer={json.dumps(str(first / 'tokenizer'))}", "exits.layers=[1]"])


def load_recipe_raw(name):
    from moduleformer_exit.training.recipe import bundled_recipe_path

    with open(bundled_recipe_path(name), encoding="utf-8") as f:
        return json.load(f)
