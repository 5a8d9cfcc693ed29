"""Expert pruning: per-layer expert counts in the config, exactness of the sliced model against the unpruned model
with masked router logits (all gate types, eval and aux loss), save / reload in a fresh process, bad input."""
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from moduleformer_exit import ModuleFormerConfig, ModuleFormerForCausalLM
from moduleformer_exit.pruning import prune_experts

from conftest import tiny_config_kwargs

MASK = -1e30  # "minus infinity" that keeps 0 * log p finite in the mi aux loss (exp underflows to exactly 0)


def mask_router_logits(model, keep):
    """Reference: the unpruned model, with every dropped expert's router logit replaced by MASK (independent of the
    pruning code: it wraps each gate's ``compute_logits``)."""
    base = model.transformer
    for kind, ids_per_layer in keep.items():
        for block, ids in zip(base.h, ids_per_layer):
            gate = (block.attn.q_proj if kind == "att" else block.mlpf).gate
            dropped = torch.ones(gate.num_experts, dtype=torch.bool)
            dropped[list(ids)] = False
            original = gate.compute_logits
            gate.compute_logits = lambda x, f=original, d=dropped: f(x).masked_fill(d, MASK)
    return model


KEEP = {"att": [[0, 2], [1, 2, 3]], "mlp": [[5, 1, 3], [0, 4]]}


def _pair(tiny_model, gate_type, seed=0, **kw):
    torch.manual_seed(seed)
    reference = mask_router_logits(tiny_model(seed=seed, gate_type=gate_type, **kw), KEEP)
    pruned = prune_experts(tiny_model(seed=seed, gate_type=gate_type, **kw), KEEP)
    return reference, pruned


def _rel(a, b):
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max() / b.abs().max())


def test_per_layer_counts_config(tiny_config):
    config = tiny_config(n_att_experts=[4, 3], n_mlp_experts=[6, 6])
    assert config.n_att_experts == [4, 3] and config.n_mlp_experts == 6  # uniform list stored as IBM's int
    assert [config.att_experts_at(i) for i in range(2)] == [4, 3]
    model = ModuleFormerForCausalLM(config)
    assert [b.attn.q_proj.experts.weight.shape[0] for b in model.transformer.h] == [4, 3]
    assert [b.attn.q_proj.gate.w_gate[3].weight.shape[0] for b in model.transformer.h] == [4, 3]
    with pytest.raises(ValueError, match="k_att .*layer 1"):
        tiny_config(n_att_experts=[4, 1])
    with pytest.raises(ValueError, match="one count per layer"):
        tiny_config(n_mlp_experts=[6, 6, 6])
    with pytest.raises(ValueError, match="positive integers"):
        tiny_config(n_mlp_experts=[6, 0])


def test_per_layer_counts_save_load(tiny_config, tmp_path):
    config = tiny_config(n_att_experts=[4, 3], n_mlp_experts=[2, 6])
    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["n_att_experts"] == [4, 3] and saved["n_mlp_experts"] == [2, 6]
    assert ModuleFormerConfig.from_pretrained(tmp_path).n_mlp_experts == [2, 6]


@pytest.mark.parametrize("gate_type", ["mlp", "linear", "gmm"])
def test_pruned_logits_equal_masked_router(tiny_model, gate_type):
    reference, pruned = _pair(tiny_model, gate_type)
    assert [b.mlpf.experts.weight.shape[0] for b in pruned.transformer.h] == [3, 2]
    assert pruned.config.n_att_experts == [2, 3] and pruned.config.n_mlp_experts == [3, 2]
    x = torch.randint(3, 97, (2, 7))
    with torch.no_grad():
        want, got = reference(x).logits, pruned(x).logits
    assert _rel(got, want) < 1e-5
    # The reference is not trivially equal to the unpruned model.
    with torch.no_grad():
        unpruned = tiny_model(seed=0, gate_type=gate_type)(x).logits
    assert _rel(unpruned, want) > 1e-3


@pytest.mark.parametrize("gate_type", ["mlp", "linear", "gmm"])
def test_pruned_training_loss_and_grads_equal_masked_router(tiny_model, gate_type):
    reference, pruned = _pair(tiny_model, gate_type, aux_loss_weight=0.5, aux_loss_type="mi")
    reference.train(), pruned.train()
    x = torch.randint(3, 97, (2, 7))
    out_ref, out = reference(x, labels=x), pruned(x, labels=x)
    assert _rel(out.aux_loss, out_ref.aux_loss) < 1e-5
    assert _rel(out.loss, out_ref.loss) < 1e-5
    out_ref.loss.backward(), out.loss.backward()
    ids = torch.tensor(KEEP["mlp"][0]).sort().values
    g_ref = reference.transformer.h[0].mlpf.experts.weight.grad[ids]
    assert _rel(pruned.transformer.h[0].mlpf.experts.weight.grad, g_ref) < 1e-5


def test_switch_aux_loss_scales_with_expert_count(tiny_model):
    """The switch balance term is E * sum_e P_e f_e: after pruning E is the kept count, so the pruned model's balance
    equals the masked model's times E_kept / E (the z-loss is unchanged)."""
    keep = {"mlp": [[0, 1, 2], [0, 1, 2]], "att": [[0, 1, 2, 3], [0, 1, 2, 3]]}
    torch.manual_seed(0)
    reference = mask_router_logits(tiny_model(seed=0, aux_loss_type="switch"), keep)
    pruned = prune_experts(tiny_model(seed=0, aux_loss_type="switch"), keep)
    x = torch.randint(3, 97, (2, 7)).reshape(-1, 1)
    hidden = torch.randn(14, 32)
    ref_gate, gate = reference.transformer.h[0].mlpf.gate, pruned.transformer.h[0].mlpf.gate
    r_ref, r = ref_gate(hidden), gate(hidden)
    probs, logits = r_ref.probs.double(), r_ref.logits.double()
    freq = torch.zeros(6, dtype=torch.float64).index_add_(0, r_ref.top_k_indices.flatten(),
                                                         torch.ones(r_ref.top_k_indices.numel(), dtype=torch.float64))
    balance_masked = 6 * ((probs.sum(0) / probs.sum()) * (freq / freq.sum())).sum()
    z = torch.logsumexp(logits[:, :3], -1).pow(2).mean()
    assert abs(float(gate.aux_loss_of(r)) - float(balance_masked * 3 / 6 + 0.1 * z)) < 1e-5


def test_prune_save_reload_fresh_process(tiny_model, tmp_path):
    pruned = prune_experts(tiny_model(seed=3, gate_type="gmm"), KEEP)
    pruned.save_pretrained(tmp_path)
    x = torch.randint(3, 97, (2, 7))
    with torch.no_grad():
        want = pruned(x).logits
    torch.save({"x": x, "logits": want}, tmp_path / "io.pt")
    script = textwrap.dedent(f"""
        import json, torch
        import moduleformer_exit
        from transformers import AutoModelForCausalLM
        model, info = AutoModelForCausalLM.from_pretrained({str(tmp_path)!r}, output_loading_info=True)
        io = torch.load({str(tmp_path / "io.pt")!r}, weights_only=True)
        with torch.no_grad():
            got = model.eval()(io["x"]).logits
        print(json.dumps({{"diff": float((got - io["logits"]).abs().max()),
                           "missing": sorted(info["missing_keys"]), "unexpected": sorted(info["unexpected_keys"]),
                           "mismatched": [str(m) for m in info["mismatched_keys"]],
                           "att": model.config.n_att_experts, "mlp": model.config.n_mlp_experts,
                           "shapes": [list(b.mlpf.experts.weight.shape) for b in model.transformer.h]}}))
    """)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["diff"] == 0.0
    assert result["missing"] == [] and result["unexpected"] == [] and result["mismatched"] == []
    assert result["att"] == [2, 3] and result["mlp"] == [3, 2]
    assert result["shapes"] == [[3, 32, 24], [2, 32, 24]]


def test_uniform_prune_saves_int_form(tiny_model, tmp_path):
    pruned = prune_experts(tiny_model(), {"mlp": [[0, 1, 2], [3, 4, 5]]})
    pruned.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["n_mlp_experts"] == 3 and saved["n_att_experts"] == 4


@pytest.mark.parametrize("keep, match", [
    ({"mlp": [[], [0, 1]]}, "is empty"),
    ({"mlp": [[0], [0, 1]]}, "keep at least 2"),
    ({"mlp": [[0, 6], [0, 1]]}, r"out of range: layer 0 has 6"),
    ({"mlp": [[0, 0, 1], [0, 1]]}, "repeats"),
    ({"mlp": [[0, 1]]}, "lists 1 layers but the model has 2"),
    ({"ffn": [[0, 1], [0, 1]]}, "unknown expert kind"),
])
def test_prune_bad_keep(tiny_model, keep, match):
    model = tiny_model()
    before = [p.clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=match):
        prune_experts(model, keep)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # nothing half-pruned
