"""DeepSpeed pretraining end to end, in subprocesses (CPU, gloo): exact resume after kill -9, an interrupted checkpoint
write never replaces the last good one, 2-process ZeRO-2 through torchrun, export loading in a fresh process, exit-head
training and fine-tuning on the exported model."""
import json
import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch
from conftest import child_process_env

pytest.importorskip("deepspeed")
pytest.importorskip("datasets")

KILLER = os.path.join(os.path.dirname(__file__), "helpers", "kill_pretrain.py")
STEPS = 8  # tiny recipe: checkpoints at steps 3, 6 and 8 (save_interval 3 + the end)




def _pretrain(tmp_root, out, *extra, fault=None, nproc=1, sets=()):
    env = child_process_env(tmp_root)
    args = ["tiny", "--output-dir", str(out), "--no-progress", "--set", f"data.files=[\"{tmp_root / 'corpus.txt'}\"]",
            "--set", f"training.max_steps={STEPS}", "--set", "training.eval_interval=4"]
    for s in sets:
        args += ["--set", s]
    if fault:  # "phase:step", see tests/helpers/kill_pretrain.py
        cmd = [sys.executable, str(KILLER), fault, *args, *extra]
    elif nproc == 1:
        cmd = [sys.executable, "-m", "moduleformer_exit.training.pretrain", *args, *extra]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
               "-m", "moduleformer_exit.training.pretrain", *args, *extra]
    return subprocess.run(cmd, env=env, cwd=str(tmp_root), capture_output=True, text=True, timeout=300)


def _records(out, kind):
    """Last record of ``kind`` per step (a resumed run appends the steps it redoes)."""
    recs = {}
    for line in open(out / "log.jsonl"):
        r = json.loads(line)
        if r["kind"] == kind and "step" in r:
            recs[r["step"]] = r
    return recs


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("ds")
    from importlib.resources import files

    text = (files("moduleformer_exit.data") / "austen" / "persuasion.txt").read_text(encoding="utf-8")
    (root / "corpus.txt").write_text(text[:120_000], encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def reference(root):
    """An uninterrupted single-process ZeRO-2 run (micro batch 4 x accumulation 2)."""
    out = root / "ref"
    proc = _pretrain(root, out)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out


def _assert_same_training(ref, run, from_step=1):
    a, b = _records(ref, "train"), _records(run, "train")
    assert sorted(a) == sorted(b) == list(range(1, STEPS + 1))
    for step in range(from_step, STEPS + 1):
        assert b[step]["loss"] == a[step]["loss"], (step, a[step]["loss"], b[step]["loss"])
        assert b[step]["lr"] == a[step]["lr"]
    ea, eb = _records(ref, "eval"), _records(run, "eval")
    assert ea[STEPS] == {**eb[STEPS], "elapsed_s": ea[STEPS]["elapsed_s"]}


def test_reference_run_outputs(reference):
    ckpt = reference / "checkpoints"
    assert open(ckpt / "latest").read() == f"step_{STEPS}"
    assert sorted(d for d in os.listdir(ckpt) if d.startswith("step_")) == ["step_6", f"step_{STEPS}"]  # keep 2
    assert (reference / "final" / "model.safetensors").is_file()
    assert (reference / "final" / "tokenizer.json").is_file()
    train = _records(reference, "train")
    assert train[STEPS]["loss"] < train[1]["loss"]
    assert {"ce", "ce_exit1", "aux", "tokens_per_s"} <= set(train[1])
    ev = _records(reference, "eval")[STEPS]
    assert {"ppl_final", "ppl_exit1"} <= set(ev)


def test_kill9_mid_run_then_exact_resume(root, reference):
    out = root / "killed"
    proc = _pretrain(root, out, fault="after_step:5")
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert open(out / "checkpoints" / "latest").read() == "step_3"
    assert max(_records(out, "train")) == 5
    proc = _pretrain(root, out)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert _records(out, "resume")[3]["position"] == 3 * 8
    _assert_same_training(reference, out)


def test_interrupted_checkpoint_write_keeps_last_good(root, reference):
    out = root / "killed_in_save"
    proc = _pretrain(root, out, fault="after_staging:6")
    assert proc.returncode == -signal.SIGKILL
    ckpt = out / "checkpoints"
    assert (ckpt / "step_6.tmp" / "mp_rank_00_model_states.pt").is_file()  # DeepSpeed's files of step 6 were written ...
    assert open(ckpt / "latest").read() == "step_3"  # ... but the pointer still names the last complete one
    assert not (ckpt / "latest.tmp").exists()
    proc = _pretrain(root, out)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert _records(out, "resume")[3]["tag"] == "step_3"
    _assert_same_training(reference, out)


def test_no_resume_restart_killed_while_replacing_the_latest_checkpoint(root, reference):
    # a --no-resume rerun saving only at the end re-writes step_8, the checkpoint latest names; killed after the old
    # step_8 moved aside and before the new one took its place, the rerun still resumes the old, whole step_8
    out = root / "no_resume_killed"
    shutil.copytree(reference, out)
    sets = ["training.save_interval=100"]
    proc = _pretrain(root, out, "--no-resume", fault=f"between_renames:{STEPS}", sets=sets)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    ckpt = out / "checkpoints"
    assert open(ckpt / "latest").read() == f"step_{STEPS}" and not (ckpt / f"step_{STEPS}").exists()
    proc = _pretrain(root, out, sets=sets)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert _records(out, "resume")[STEPS]["tag"] == f"step_{STEPS}"
    heldout = json.loads(proc.stdout.strip().splitlines()[-1])["heldout"]  # evaluated on the resumed weights
    ref_eval = _records(reference, "eval")[STEPS]
    assert heldout == {k: v for k, v in ref_eval.items() if k.startswith("ppl")}


def test_two_process_zero2_torchrun_matches_single_process(root, reference):
    # 2 ranks x micro batch 4 x accumulation 1 sees the same micro-batches as 1 rank x 4 x 2 (same global batch 8)
    out = root / "two_proc"
    proc = _pretrain(root, out, nproc=2, sets=["deepspeed.gradient_accumulation_steps=1"])
    assert proc.returncode == 0, proc.stderr[-4000:]
    a, b = _records(reference, "train"), _records(out, "train")
    start = [json.loads(line) for line in open(out / "log.jsonl") if '"start"' in line]
    assert start[0]["world_size"] == 2
    for step in range(1, STEPS + 1):
        assert b[step]["loss"] == pytest.approx(a[step]["loss"], rel=1e-4, abs=1e-4), step
    assert len([d for d in os.listdir(out / "checkpoints" / f"step_{STEPS}") if "optim_states" in d]) == 2


def test_export_loads_with_automodel_in_fresh_process(root, reference):
    final = reference / "final"
    code = (
        "import sys, torch, moduleformer_exit\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(final)!r}).eval()\n"
        f"t = AutoTokenizer.from_pretrained({str(final)!r})\n"
        "assert type(m).__name__ == 'ModuleFormerForCausalLM', type(m)\n"
        "ids = t('It was a truth', return_tensors='pt').input_ids\n"
        "with torch.no_grad():\n"
        "    logits = m(ids).logits\n"
        "    gen = m.generate(ids, max_new_tokens=5, do_sample=False)\n"
        f"torch.save({{'ids': ids, 'logits': logits, 'gen': gen}}, {str(root / 'fresh.pt')!r})\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], env=child_process_env(root), cwd=str(root), capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    saved = torch.load(root / "fresh.pt", weights_only=True)
    assert saved["gen"].shape[1] == saved["ids"].shape[1] + 5
    from moduleformer_exit import AutoMultiExitModel

    model = AutoMultiExitModel.from_pretrained(str(final)).eval()  # exits come back too
    assert model.exit_layers == [1]
    with torch.no_grad():
        assert torch.allclose(model(saved["ids"]).logits, saved["logits"], atol=1e-6)


def test_train_exits_on_frozen_base(root, reference, tmp_path):
    from moduleformer_exit import AutoMultiExitModel
    from moduleformer_exit.training.exits import train_exits

    corpus = str(root / "corpus.txt")
    res = train_exits(str(reference / "final"), [1, 2], corpus, str(tmp_path / "mf_exits"), steps=15, lr=1e-2,
                      batch_size=8, block_size=32, max_heldout_blocks=16)
    assert set(res["before"]) == {"final", "exit1", "exit2"}
    assert res["before"]["final"] == pytest.approx(res["after"]["final"])  # base frozen
    for k in ("exit1", "exit2"):
        assert res["after"][k] < res["before"][k]
    assert AutoMultiExitModel.from_pretrained(str(tmp_path / "mf_exits")).exit_layers == [1, 2]

    # the base's own exits are kept: training exit 2 alone keeps the trained exit 1 (here fixed)
    res = train_exits(str(reference / "final"), [2], corpus, str(tmp_path / "keep"), steps=3, lr=1e-2,
                      batch_size=8, block_size=32, max_heldout_blocks=16, freeze_existing=True)
    assert AutoMultiExitModel.from_pretrained(str(tmp_path / "keep")).exit_layers == [1, 2]
    assert res["before"]["exit1"] == pytest.approx(res["after"]["exit1"])  # frozen ...
    kept = AutoMultiExitModel.from_pretrained(str(tmp_path / "keep")).name_to_lm_exit_head["lm_head_1"].weight
    trained = AutoMultiExitModel.from_pretrained(str(reference / "final")).name_to_lm_exit_head["lm_head_1"].weight
    assert torch.equal(kept, trained)  # ... and the trained head, not re-initialised

    # GPT-2 base through the same path
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    tok = AutoTokenizer.from_pretrained(str(reference / "final"))
    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=64, n_embd=32, n_layer=2, n_head=2))
    gpt2.save_pretrained(tmp_path / "gpt2")
    tok.save_pretrained(tmp_path / "gpt2")
    res = train_exits(str(tmp_path / "gpt2"), [1], corpus, str(tmp_path / "gpt2_exits"), steps=15, lr=1e-2,
                      batch_size=8, block_size=32, max_heldout_blocks=16, init="random")
    assert res["after"]["exit1"] < res["before"]["exit1"]
    assert res["before"]["final"] == pytest.approx(res["after"]["final"])


def test_finetune_lora_and_classification(root, reference, tmp_path):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from moduleformer_exit.training.finetune import finetune

    m = finetune(str(reference / "final"), str(root / "corpus.txt"), str(tmp_path / "ft"), block_size=32,
                 max_steps=4, lr=5e-3, batch_size=4, eval_fraction=0.02, lora={"r": 4})
    assert m["perplexity"] < m["perplexity_before"]
    AutoModelForCausalLM.from_pretrained(str(tmp_path / "ft"))  # merged LoRA saves as a plain checkpoint
    from moduleformer_exit import AutoMultiExitModel

    # the exit head survives fine-tuning (the strict loader refuses a config naming a head the weights lack)
    assert AutoMultiExitModel.from_pretrained(str(tmp_path / "ft")).exit_layers == [1]
    assert m["perplexity_exit1"] > 1

    data = tmp_path / "cls.jsonl"
    rows = [{"text": f"{'happy glad joy' if i % 2 else 'sad gloomy grief'} {i}", "label": i % 2} for i in range(40)]
    data.write_text("\n".join(json.dumps(r) for r in rows))
    m = finetune(str(reference / "final"), str(data), str(tmp_path / "cls"), task="sequence-classification",
                 data_format="json", block_size=16, max_steps=3, lr=1e-3, batch_size=8, eval_fraction=0.2)
    assert "eval_loss" in m
    model = AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "cls"))
    assert model.config.num_labels == 2
    assert not getattr(model.config, "lm_head_layer_indices", None)  # names no exit head it lacks


def test_finetune_hf_trainer_deepspeed_zero3_two_processes(root, reference, tmp_path):
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
                              "gradient_clipping": "auto", "train_batch_size": "auto",
                              "zero_optimization": {"stage": 3, "stage3_gather_16bit_weights_on_model_save": True}}))
    out = tmp_path / "ft_ds"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
           "moduleformer_exit.training.finetune", "--model", str(reference / "final"), "--data",
           str(root / "corpus.txt"), "--output-dir", str(out), "--block-size", "32", "--max-steps", "3",
           "--batch-size", "4", "--deepspeed", str(ds)]
    proc = subprocess.run(cmd, env=child_process_env(root), cwd=str(root), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(out))  # ZeRO-3 partitions gathered on save
    ref = AutoModelForCausalLM.from_pretrained(str(reference / "final"))
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in ref.parameters())
    assert json.loads((out / "finetune_metrics.json").read_text())["perplexity"] > 1


def test_bench_training_smoke():
    from moduleformer_exit.benchmarks.training import bench_training

    rows = bench_training(model=dict(vocab_size=128, n_embd=32, n_layer=2, n_head=2, att_hidden=16, ffd_hidden=32,
                                     n_att_experts=4, k_att=2, n_mlp_experts=4, k_mlp=2, gating_size=8),
                          exits=(1,), batch_size=2, seq_len=16, steps=1, warmup=1, stages=(3,), threads=1)
    assert [(r["mode"], r["stage"]) for r in rows] == [("torch", None), ("deepspeed", 3)]
    assert rows[0]["final_loss"] == pytest.approx(rows[1]["final_loss"], rel=1e-5)  # same model, batch, step
    assert all(r["tokens_per_s"] > 0 and r["peak_rss_mb"] > 0 for r in rows)
