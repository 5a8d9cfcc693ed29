"""Extension: new experts and router rows appended per layer; after optimizer steps through DeepSpeed the old
experts, old router rows and every other parameter are bit-identical, the new ones moved."""
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from moduleformer_exit.pruning import add_experts, freeze_old_experts

pytest.importorskip("deepspeed")

SCRIPT = textwrap.dedent("""
    import json, sys, torch
    sys.path.insert(0, {tests!r})
    from conftest import tiny_config_kwargs
    from moduleformer_exit import ModuleFormerConfig, ModuleFormerForCausalLM
    from moduleformer_exit.pruning import add_experts, expert_counts, freeze_old_experts
    from moduleformer_exit.training.extend import train_steps

    results = {{}}
    for gate, init in (("mlp", "random"), ("gmm", "clone")):
        torch.manual_seed(0)
        config = ModuleFormerConfig(**tiny_config_kwargs(gate_type=gate, aux_loss_weight=0.1))
        model = ModuleFormerForCausalLM(config)
        old = {{n: p.detach().clone() for n, p in model.named_parameters()}}
        counts = expert_counts(model)
        add_experts(model, n_att=1, n_mlp=2, init=init)
        grown = {{n: p.detach().clone() for n, p in model.named_parameters()}}
        mask = freeze_old_experts(model, counts)
        blocks = torch.randint(3, 97, (16, 8))
        train_steps(model, blocks, steps=3, batch_size=4, lr=1e-2, weight_decay=0.5, mask=mask)
        frozen_same, new_moved, shapes = [], [], {{}}
        for n, p in model.named_parameters():
            o = old[n]
            if p.shape != o.shape:
                shapes[n] = [list(o.shape), list(p.shape)]
                frozen_same.append(bool(torch.equal(p[: o.shape[0]], o)))
                new_moved.append(bool((p[o.shape[0]:] != grown[n][o.shape[0]:]).any()))
            else:
                frozen_same.append(bool(torch.equal(p, o)))
        results[gate] = {{"frozen_same": frozen_same, "new_moved": new_moved, "shapes": shapes}}
    print(json.dumps(results))
""")


@pytest.fixture(scope="module")
def deepspeed_results(tmp_path_factory):
    """Both gate types (mlp + random init, gmm + clone init) in one child process (one DeepSpeed import)."""
    tmp = tmp_path_factory.mktemp("extend")
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", HF_HUB_OFFLINE="1",
               TORCH_EXTENSIONS_DIR=str(tmp / "ext"))
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    out = subprocess.run([sys.executable, "-c", SCRIPT.format(tests=os.path.dirname(__file__))],
                         capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("gate", ["mlp", "gmm"])
def test_extension_deepspeed_steps_keep_old_slices(deepspeed_results, gate):
    result = deepspeed_results[gate]
    assert all(result["frozen_same"]), result
    assert result["new_moved"] and all(result["new_moved"]), result
    shapes = result["shapes"]
    assert shapes["transformer.h.0.mlpf.experts.weight"] == [[6, 32, 24], [8, 32, 24]]
    assert shapes["transformer.h.1.attn.q_proj.output_experts.weight"] == [[4, 16, 32], [5, 16, 32]]
    router = ("transformer.h.0.mlpf.gate.w_gate.3.weight" if gate == "mlp"
              else "transformer.h.0.mlpf.gate.expert_centroids")
    assert shapes[router] == [[6, 8], [8, 8]]


def test_add_experts_config_and_forward(tiny_model, tmp_path):
    model = tiny_model(seed=0)
    add_experts(model, n_mlp=2, init="clone")
    assert model.config.n_mlp_experts == 8 and model.config.n_att_experts == 4
    # A clone has its source's weights and router row.
    moe = model.transformer.h[0].mlpf
    assert torch.equal(moe.experts.weight[6], moe.experts.weight[0])
    assert torch.equal(moe.gate.w_gate[3].weight[7], moe.gate.w_gate[3].weight[1])
    model.save_pretrained(tmp_path)
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    x = torch.randint(3, 97, (1, 5))
    with torch.no_grad():
        assert torch.equal(reloaded(x).logits, model(x).logits)


def test_decay_new_slices_and_bad_input(tiny_model):
    model = tiny_model(seed=0)
    counts = {"att": [4, 4], "mlp": [6, 6]}
    add_experts(model, n_mlp=1)
    mask = freeze_old_experts(model, counts)
    p, n_old = mask.frozen_rows[0]
    before = p.detach().clone()
    mask.decay_new_slices(lr=0.1, weight_decay=0.5)
    assert torch.equal(p[:n_old], before[:n_old])
    assert torch.allclose(p[n_old:], before[n_old:] * 0.95, rtol=0, atol=1e-7)
    assert all(not q.requires_grad for n, q in model.named_parameters() if "attn" in n or "ln" in n or "wte" in n)
    with pytest.raises(ValueError, match="nothing to add"):
        add_experts(model)
    with pytest.raises(ValueError, match="no layer has new experts"):
        freeze_old_experts(model, {"att": [4, 4], "mlp": [7, 7]})
