"""Expert-parallel pretraining (``deepspeed.ep_size``) on 2 CPU gloo ranks: the sharded layers equal the unsharded
ones in float64 under uneven routing; EP=2 gives EP=1's losses, gradients and clipping norm for 3 steps under
ZeRO-1 and ZeRO-2; the gathered export loads on one process with EP=1's logits; a kill -9 mid-run resumes exactly;
bad ``ep_size`` values (ZeRO-3, indivisible counts, world size) are refused with the fix."""
import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import child_process_env

pytest.importorskip("deepspeed")
pytest.importorskip("datasets")

HELPERS = os.path.join(os.path.dirname(__file__), "helpers")
TOL = 1e-5  # fp32, relative to each tensor's largest entry




def _torchrun(tmp, *args):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]
    return subprocess.run(cmd, env=child_process_env(tmp), cwd=str(tmp), capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def worker(tmp_path_factory):
    out = tmp_path_factory.mktemp("ep_worker")
    proc = _torchrun(out, os.path.join(HELPERS, "expert_parallel_worker.py"), str(out))
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out, json.loads((out / "results.json").read_text())


@pytest.mark.parametrize("case", ["random", "rank0_sends_nothing_to_rank1", "rank1_receives_nothing"])
def test_sharded_layers_equal_unsharded_in_float64(worker, case):
    _, res = worker
    r0, r1 = res["rank0"]["layers"][case], res["rank1"]["layers"][case]
    for r in (r0, r1):  # outputs, input / router / expert gradients (MLP forward, attention map -> reduce)
        assert max(r["errors"].values()) < 1e-12, r["errors"]
        assert sum(r["att_send_splits"]) == 3 * 5 * 2  # every (token, slot) pair sent: none dropped
    assert r0["att_send_splits"][1] == r1["att_recv_splits"][0]  # what rank 0 sends rank 1 is what it receives
    # the forced routing really happened: uneven splits, including empty ones
    if case == "rank0_sends_nothing_to_rank1":
        assert r0["mlp_experts_used"] == [0, 1]  # rank 0's MLP rows all stay on rank 0 (0 rows to rank 1)
        assert 0 not in r1["att_experts_used"]  # attention expert 0 receives no row from rank 1
    if case == "rank1_receives_nothing":
        assert r0["att_send_splits"] == [30, 0] and r1["att_send_splits"] == [30, 0]
        assert r1["att_recv_splits"] == [0, 0]  # rank 1's experts get no row at all (empty grouped GEMMs)


@pytest.mark.parametrize("stage", [1, 2])
def test_ep2_equals_ep1_for_three_steps(worker, stage):
    _, res = worker
    for rank in ("rank0", "rank1"):
        r = res[rank]["training"][f"zero{stage}"]
        assert r["ep2_losses"] == pytest.approx(r["ep1_losses"], rel=TOL)
        assert max(r["grad_rel_err_per_step"]) < TOL, (r["grad_rel_err_per_step"], r["worst_param_last_step"])
        assert r["n_params_compared"] == 41  # every parameter, experts gathered from both ranks
        assert r["ep2_grad_norms"] == pytest.approx(r["ep1_grad_norms"], rel=TOL)  # clipping saw every expert
        assert min(r["ep1_grad_norms"]) > 0.1  # ... and clipped (threshold 0.1)
        assert r["local_expert_shape"] == [2, 32, 16]  # each rank holds 2 of the 4 attention experts
        assert r["moe_groups"] >= 1  # experts in DeepSpeed's MoE optimizer group
        # attention expert 0 of layer 1 never received a token: zero gradient, in both runs
        assert r["empty_expert_grad_max"] == r["empty_expert_grad_max_ep1"] == 0.0


@pytest.mark.parametrize("stage", [1, 2])
def test_gathered_export_loads_on_one_process_with_ep1_logits(worker, stage):
    from transformers import AutoModelForCausalLM

    import moduleformer_exit  # noqa: F401  (registers the model type)

    out, _ = worker
    ep1 = AutoModelForCausalLM.from_pretrained(str(out / f"zero{stage}_ep1")).eval()
    ep2 = AutoModelForCausalLM.from_pretrained(str(out / f"zero{stage}_ep2")).eval()
    assert ep2.config.n_mlp_experts == 4 and ep2.transformer.h[0].mlpf.experts.weight.shape[0] == 4  # all experts
    ids = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        a, b = ep1(ids).logits, ep2(ids).logits
    assert (a - b).abs().max() <= TOL * a.abs().max()


# ----------------------------------------------------------------------------------------------- pretrain CLI
def _pretrain_args(tmp, out):
    return ["tiny", "--output-dir", str(out), "--no-progress",
            "--set", f"data.files=[\"{tmp / 'corpus.txt'}\"]", "--set", "training.max_steps=6",
            "--set", "training.eval_interval=6", "--set", "deepspeed.ep_size=2",
            "--set", "deepspeed.gradient_accumulation_steps=1"]


def test_kill9_mid_run_resumes_exactly_and_exports_all_experts(tmp_path):
    from importlib.resources import files

    text = (files("moduleformer_exit.data") / "austen" / "persuasion.txt").read_text(encoding="utf-8")
    (tmp_path / "corpus.txt").write_text(text[:60_000], encoding="utf-8")
    out = tmp_path / "run"
    killed = _torchrun(tmp_path, os.path.join(HELPERS, "kill_pretrain.py"), "after_step:5",
                       *_pretrain_args(tmp_path, out))
    assert killed.returncode != 0
    ckpt = out / "checkpoints"
    assert open(ckpt / "latest").read() == "step_3"
    assert sorted(p.name for p in (ckpt / "step_3").glob("experts_ep*.safetensors")) == \
        ["experts_ep0.safetensors", "experts_ep1.safetensors"]
    proc = _torchrun(tmp_path, "-m", "moduleformer_exit.training.pretrain", *_pretrain_args(tmp_path, out))
    assert proc.returncode == 0, proc.stderr[-4000:]
    records = [json.loads(line) for line in open(out / "log.jsonl")]
    first = {r["step"]: r for r in records[:records.index(next(r for r in records if r["kind"] == "resume"))]
             if r["kind"] == "train"}
    resumed = {r["step"]: r for r in records if r["kind"] == "train" and r is not first.get(r["step"])}
    assert sorted(first) == [1, 2, 3, 4, 5] and sorted(resumed) == [4, 5, 6]
    for step in (4, 5):  # the steps trained twice: before the kill and after resuming from step 3
        assert resumed[step]["loss"] == first[step]["loss"] and resumed[step]["lr"] == first[step]["lr"]
    start = next(r for r in records if r["kind"] == "start")
    assert start["ep_size"] == 2 and start["n_params_per_rank"] < start["n_params"]

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(out / "final"))  # one process, every expert
    assert model.transformer.h[1].attn.q_proj.experts.weight.shape[0] == 4
    assert model.transformer.h[1].mlpf.output_experts.weight.shape[0] == 4


# ----------------------------------------------------------------------------------------------- no processes
def test_bad_ep_size_is_refused_with_the_fix():
    from moduleformer_exit.training.recipe import RecipeError, load_recipe

    with pytest.raises(RecipeError, match="needs ZeRO stage 0, 1 or 2"):
        load_recipe("tiny", ["deepspeed.ep_size=2", "deepspeed.zero_optimization.stage=3"])
    with pytest.raises(RecipeError, match=r"must divide every layer's expert count .*\[4\]"):
        load_recipe("tiny", ["deepspeed.ep_size=8"])
    with pytest.raises(RecipeError, match="ep_size must be a positive integer"):
        load_recipe("tiny", ["deepspeed.ep_size=\"2\""])
    with pytest.raises(RecipeError, match=r"must divide every layer's expert count .*\[3\]"):  # pruned layer counts
        load_recipe("tiny", ["deepspeed.ep_size=2", "model.n_mlp_experts=[4, 3]"])
    from moduleformer_exit.training.expert_parallel import check_expert_parallel_config

    assert "must divide the number of processes (3)" in check_expert_parallel_config(2, 2, world_size=3)[0]
    assert check_expert_parallel_config(1, 3) == []  # ep_size 1: ZeRO-3 as before


def test_ep_size_one_changes_nothing():
    from moduleformer_exit.training.pretrain import deepspeed_config, param_groups
    from moduleformer_exit.training.recipe import ep_size, load_recipe

    plain, explicit = load_recipe("tiny"), load_recipe("tiny", ["deepspeed.ep_size=1"])
    assert ep_size(plain) == ep_size(explicit) == 1
    assert deepspeed_config(plain, 2) == deepspeed_config(explicit, 2)  # ep_size never reaches DeepSpeed
    assert "ep_size" not in deepspeed_config(load_recipe("tiny", ["deepspeed.ep_size=2"]), 2)
    assert all("name" not in g for g in param_groups(torch.nn.Linear(2, 2), 0.1))  # ep_size 1: groups untouched


def test_model_package_imports_without_deepspeed():
    code = ("import sys; sys.modules['deepspeed'] = None\n"  # any `import deepspeed` now raises ImportError
            "import moduleformer_exit.expert_parallel as ep\n"
            "assert not [m for m in sys.modules if m.startswith('deepspeed') and sys.modules[m] is not None]\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_memory_model_of_molm_350m_4b_by_hand():
    from moduleformer_exit.benchmarks.expert_parallel import memory_model

    rows = {(r["strategy"], r["gpus"]): r for r in memory_model()}
    d, a, f, layers = 1024, 1024, 2048, 24  # configs/moduleformer-350m-active.json: 16 attention, 32 MLP experts
    experts = layers * (16 * 2 * d * a + 32 * 2 * d * f)
    total = rows[("ZeRO-3", 8)]["params"]
    assert rows[("ZeRO-3", 8)]["expert_params"] == experts
    for n in (8, 64):
        dp, z3, ep = rows[("DP + ZeRO-2", n)], rows[("ZeRO-3", n)], rows[("EP=8 + ZeRO-2", n)]
        assert dp["weights_gb"] == pytest.approx(2 * total / 1e9)  # bf16 weights replicated
        assert z3["weights_gb"] == pytest.approx(2 * total / n / 1e9)
        assert ep["weights_gb"] == pytest.approx((2 * (total - experts) + 2 * experts / 8) / 1e9)
        for r in (dp, z3, ep):  # gradients and fp32 Adam states partitioned over all n ranks in every strategy
            assert r["grads_gb"] == pytest.approx(2 * total / n / 1e9)
            assert r["optimizer_gb"] == pytest.approx(12 * total / n / 1e9)
