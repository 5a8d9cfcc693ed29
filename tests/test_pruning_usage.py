"""Expert usage (against a naive per-token loop in fp64), keep selection from scores and budgets, and the
reconstruction criterion (against a brute-force search through the real MoE layer with masked router logits)."""
import itertools

import pytest
import torch

from moduleformer_exit.pruning import ExpertUsage, collect_expert_usage
from moduleformer_exit.pruning.reconstruction import reconstruction_keep
from moduleformer_exit.pruning.select import layer_keep_counts, parse_budget, select_by_scores


def _batch():
    torch.manual_seed(1)
    x = torch.randint(3, 97, (2, 6))
    mask = torch.ones_like(x)
    mask[1, :2] = 0  # left padding: excluded from every statistic
    return x, mask


def _naive_usage(model, x, mask):
    """Per-token Python loop, fp64: counts, gate mass and mean gate*||expert output|| per expert."""
    base = model.transformer
    captured = {}
    hooks = []
    for i, block in enumerate(base.h):
        hooks.append(block.attn.register_forward_pre_hook(lambda m, a, i=i: captured.__setitem__(("att", i), a[0])))
        hooks.append(block.mlpf.register_forward_pre_hook(lambda m, a, i=i: captured.__setitem__(("mlp", i), a[0])))
    with torch.no_grad():
        out = model(x, attention_mask=mask, output_router_logits=True, output_attentions=True, use_cache=False)
    for h in hooks:
        h.remove()
    bsz, length = x.shape
    result = {}
    for i, block in enumerate(base.h):
        for kind, logits in zip(("att", "mlp"), out.router_logits[i]):
            moe = block.attn.q_proj if kind == "att" else block.mlpf
            num, k = moe.num_experts, moe.top_k
            counts = torch.zeros(num, dtype=torch.float64)
            mass = torch.zeros(num, dtype=torch.float64)
            contrib = torch.zeros(num, dtype=torch.float64)
            w_in, w_out = moe.experts.weight.double(), moe.output_experts.weight.double()
            inp = captured[(kind, i)].double()
            if kind == "att":
                v = block.attn.v_proj(captured[(kind, i)]).double().view(bsz, length, block.attn.n_head, -1)
                weights = out.attentions[i].double()  # [B, k*nh, T, S]
            for b in range(bsz):
                for t in range(length):
                    if not mask[b, t]:
                        continue
                    probs = torch.softmax(logits[b * length + t].double(), -1)
                    gates, idx = probs.topk(k)
                    for j in range(k):
                        e = int(idx[j])
                        counts[e] += 1
                        mass[e] += gates[j]
                        if kind == "mlp":
                            f = moe.activation(inp[b, t] @ w_in[e]) @ w_out[e]
                        else:
                            heads = [weights[b, j * block.attn.n_head + h, t] @ v[b, :, h]
                                     for h in range(block.attn.n_head)]
                            f = torch.cat(heads) @ w_out[e]
                        contrib[e] += gates[j] * f.norm()
            result[(kind, i)] = (counts, mass, torch.where(counts > 0, contrib / counts.clamp(min=1), 0.0))
    return result


@pytest.mark.parametrize("gate_type", ["mlp", "gmm"])
def test_usage_matches_naive_loop(tiny_model, gate_type):
    model = tiny_model(seed=2, gate_type=gate_type)
    x, mask = _batch()
    usage = collect_expert_usage(model, [(x, mask)], progress=False)
    assert usage.tokens == int(mask.sum()) == 10
    naive = _naive_usage(model, x, mask)
    for (kind, i), (counts, mass, contrib) in naive.items():
        assert usage.stats["counts"][kind][i] == counts.tolist()
        assert torch.allclose(torch.tensor(usage.stats["gate_mass"][kind][i], dtype=torch.float64), mass, rtol=1e-5)
        got = torch.tensor(usage.stats["contribution"][kind][i], dtype=torch.float64)
        assert torch.allclose(got, contrib, rtol=1e-4, atol=1e-7), (kind, i, got, contrib)
    assert sum(usage.stats["counts"]["mlp"][0]) == 10 * 2  # k selections per real token, padding excluded


def test_usage_save_load_and_other_model(tiny_model, tmp_path):
    model = tiny_model(seed=0)
    usage = collect_expert_usage(model, [_batch()], progress=False)
    usage.save(tmp_path / "usage.json")
    loaded = ExpertUsage.load(tmp_path / "usage.json")
    assert loaded.stats == usage.stats and loaded.tokens == usage.tokens
    loaded.check_matches(model)
    with pytest.raises(ValueError, match="router weights"):
        loaded.check_matches(tiny_model(seed=1))  # same architecture, other weights
    with pytest.raises(ValueError, match="architecture"):
        loaded.check_matches(tiny_model(seed=0, n_mlp_experts=4))


def test_usage_on_multi_exit_model(tiny_config):
    from moduleformer_exit import MultiExitConfiguration, MultiExitModuleFormer

    torch.manual_seed(0)
    config = tiny_config()
    config.lm_head_layer_indices = [1]
    model = MultiExitModuleFormer(config, multi_exit_config=MultiExitConfiguration()).eval()
    usage = collect_expert_usage(model, [_batch()], progress=False)
    assert sum(usage.stats["counts"]["att"][1]) == 20


def test_budgets_and_selection():
    assert parse_budget("0.5") == 0.5 and parse_budget("3") == 3
    assert layer_keep_counts([8, 6], 0.5, 2) == [4, 3]
    with pytest.raises(ValueError, match="keep at least 2"):
        layer_keep_counts([8, 6], 0.2, 2)
    with pytest.raises(ValueError, match="in \\(0, 1\\]"):
        layer_keep_counts([8, 6], 1.5, 2)
    scores = [torch.tensor([0.1, 0.5, 0.3, 0.1]), torch.tensor([4.0, 1.0, 3.0, 2.0])]
    assert select_by_scores(scores, 2, 1) == [[1, 2], [0, 2]]
    # Global: layer-normalised scores [.1,.5,.3,.1] and [.4,.1,.3,.2]; top-1 each (1 and 0), then .3 (l0 e2), .3
    # (l1 e2): 4 of 8 experts.
    assert select_by_scores(scores, 0.5, 1, spread="global") == [[1, 2], [0, 2]]
    assert select_by_scores(scores, 3, 1, spread="global") == [[1, 2], [0]]
    with pytest.raises(ValueError, match="cannot keep k=2"):
        select_by_scores(scores, 3, 2, spread="global")


def test_reconstruction_matches_brute_force(tiny_model):
    model = tiny_model(seed=4)
    x, mask = _batch()
    keep, info = reconstruction_keep(model, [(x, mask)], {"mlp": [3, 3], "att": [2, 2]})
    assert all(i["search"] == "exhaustive" for i in info["mlp"])
    # Brute force with the real layer: run MoE.forward on the captured inputs with the dropped logits masked.
    inputs = {}
    hooks = [b.mlpf.register_forward_pre_hook(lambda m, a, i=i: inputs.__setitem__(i, a[0]))
             for i, b in enumerate(model.transformer.h)]
    with torch.no_grad():
        model(x, attention_mask=mask, use_cache=False)
    for h in hooks:
        h.remove()
    real = mask.reshape(-1).bool()
    for i, block in enumerate(model.transformer.h):
        moe = block.mlpf
        original = moe.gate.compute_logits
        with torch.no_grad():
            full = moe(inputs[i])[0].reshape(-1, 32)[real].double()
            errors = {}
            for subset in itertools.combinations(range(6), 3):
                dropped = torch.ones(6, dtype=torch.bool)
                dropped[list(subset)] = False
                moe.gate.compute_logits = lambda z, d=dropped: original(z).masked_fill(d, float("-inf"))
                y = moe(inputs[i])[0].reshape(-1, 32)[real].double()
                errors[subset] = float((y - full).pow(2).sum())
                del moe.gate.compute_logits
        best = min(errors, key=errors.get)
        assert keep["mlp"][i] == list(best)
        assert abs(info["mlp"][i]["error"] - errors[best]) <= 1e-5 * max(errors[best], 1e-12)
    greedy, greedy_info = reconstruction_keep(model, [(x, mask)], {"mlp": [3, 3]}, max_combinations=1)
    assert all(i["search"] == "greedy" for i in greedy_info["mlp"])
    assert all(g["error"] >= e["error"] - 1e-9 for g, e in zip(greedy_info["mlp"], info["mlp"]))


def test_loss_scores_sum_over_exit_heads(tiny_config):
    """Leave-one-out score with heads='all' = rise of (original head + exit) loss when one expert is masked."""
    from moduleformer_exit import MultiExitConfiguration, MultiExitModuleFormer
    from moduleformer_exit.pruning.plan import loss_scores

    torch.manual_seed(0)
    config = tiny_config()
    config.lm_head_layer_indices = [1]
    model = MultiExitModuleFormer(config, multi_exit_config=MultiExitConfiguration()).eval()
    blocks = torch.randint(3, 97, (4, 6))
    scores = loss_scores(model, blocks, ["mlp"], heads="all", batch_size=4)
    ce = torch.nn.functional.cross_entropy

    def heads_loss():
        with torch.no_grad():
            out = model(blocks, output_hidden_states=True, use_cache=False)
        hidden = out.hidden_states  # [0] embeddings, [1] block 1, ..., [-1] final LayerNorm output
        final = model.lm_head(hidden[-1]).detach().float()
        exit1 = model.name_to_lm_exit_head["lm_head_1"](model.transformer.ln_f(hidden[1])).detach().float()
        return sum(float(ce(z[:, :-1].reshape(-1, 97), blocks[:, 1:].reshape(-1))) for z in (final, exit1))

    base = heads_loss()
    gate = model.transformer.h[0].mlpf.gate  # block 0 feeds the exit at layer 1 too
    original = gate.compute_logits
    for e in (0, 3):
        gate.compute_logits = lambda x, e=e: original(x).index_fill(1, torch.tensor([e]), float("-inf"))
        want = heads_loss() - base
        del gate.compute_logits
        assert abs(float(scores["mlp"][0][e]) - want) < 1e-4
