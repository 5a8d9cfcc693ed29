"""Routers, aux losses and the MoE layer against independent float64 per-token references."""
import math

import pytest
import torch
import torch.nn.functional as F

from moduleformer_exit.gates import TopKGating, mutual_information_loss, switch_loss
from moduleformer_exit.moe import MoE


def naive_mi_loss(probs, logits):
    """-(E_x sum_e p log softmax + H(mean p)) with explicit loops, float64."""
    n, e = probs.shape
    probs, logits = probs.double().tolist(), logits.double().tolist()
    p_mean = [sum(probs[t][j] for t in range(n)) / n for j in range(e)]
    h_e = -sum(p * math.log(p + 1e-8) for p in p_mean)
    neg_h = 0.0
    for t in range(n):
        lse = math.log(sum(math.exp(v) for v in logits[t]))
        neg_h += sum(probs[t][j] * (logits[t][j] - lse) for j in range(e))
    return -(neg_h / n + h_e)


def naive_switch_loss(probs, logits, indices):
    n, e = probs.shape
    prob_sum = [probs[:, j].double().sum().item() for j in range(e)]
    counts = [0.0] * e
    for t in range(n):
        for j in indices[t].tolist():
            counts[j] += 1
    balance = e * sum(p / sum(prob_sum) * c / sum(counts) for p, c in zip(prob_sum, counts))
    z = sum(math.log(sum(math.exp(v) for v in row)) ** 2 for row in logits.double().tolist()) / n
    return balance + 0.1 * z


@pytest.mark.parametrize("gate_type", ["mlp", "linear", "gmm"])
def test_gate_selects_top_k_without_renormalising(gate_type):
    torch.manual_seed(0)
    gate = TopKGating(16, num_experts=6, top_k=3, hidden_size=8, gate_type=gate_type).eval()
    if gate_type == "gmm":
        gate.temperature.data.fill_(0.7)
    x = torch.randn(20, 16)
    routing = gate(x)
    # Independent logits, float64.
    xd = x.double()
    if gate_type == "mlp":
        w0, w3 = gate.w_gate[0], gate.w_gate[3]
        logits = F.gelu(xd @ w0.weight.double().T + w0.bias.double()) @ w3.weight.double().T
    elif gate_type == "linear":
        logits = xd @ gate.w_gate[0].weight.double().T
    else:
        z = xd @ gate.w_gate.weight.double().T
        c = gate.expert_centroids.double()
        logits = (z / z.norm(dim=-1, keepdim=True)) @ (c / c.norm(dim=-1, keepdim=True)).T * math.exp(0.7)
    probs = torch.softmax(logits, -1)
    torch.testing.assert_close(routing.probs.double(), probs, atol=1e-6, rtol=1e-5)
    expected_idx = probs.argsort(-1, descending=True)[:, :3]
    assert torch.equal(routing.top_k_indices, expected_idx)
    torch.testing.assert_close(routing.top_k_gates.double(), probs.gather(1, expected_idx), atol=1e-6, rtol=1e-5)
    assert (routing.top_k_gates.sum(-1) < 1).all()  # not renormalised


def test_sample_topk_in_training_only():
    torch.manual_seed(0)
    gate = TopKGating(8, num_experts=5, top_k=3, hidden_size=4, sample_topk=2)
    x = torch.randn(200, 8)
    gate.train()
    torch.manual_seed(3)
    r1 = gate(x)
    torch.manual_seed(3)
    r2 = gate(x)
    assert torch.equal(r1.top_k_indices, r2.top_k_indices)  # seeded -> reproducible
    top1 = r1.probs.argmax(-1)
    assert torch.equal(r1.top_k_indices[:, 0], top1)  # the first k - s are deterministic top experts
    for row in r1.top_k_indices.tolist():
        assert len(set(row)) == 3  # sampled without replacement, never the deterministic ones
    sampled_is_topk = (r1.top_k_indices[:, 1:].sort(-1).values == r1.probs.topk(3).indices[:, 1:].sort(-1).values)
    assert not sampled_is_topk.all()  # something was actually sampled
    torch.testing.assert_close(r1.top_k_gates, r1.probs.gather(1, r1.top_k_indices))
    gate.eval()
    assert torch.equal(gate(x).top_k_indices, gate(x).probs.topk(3).indices)


def test_aux_losses_against_loops():
    torch.manual_seed(1)
    logits = torch.randn(12, 5) * 2
    probs = torch.softmax(logits, -1)
    gates, idx = probs.topk(2)
    assert mutual_information_loss(probs, logits).item() == pytest.approx(naive_mi_loss(probs, logits), abs=1e-6)
    assert switch_loss(probs, logits, idx, gates).item() == pytest.approx(
        naive_switch_loss(probs, logits, idx), rel=1e-6
    )


def naive_moe(moe, x, routing, activation):
    """Per-token, per-slot float64 loop: y_t = sum_j g_tj * act(x_t W_in[e]) W_out[e]."""
    w_in, w_out = moe.experts.weight.double(), moe.output_experts.weight.double()
    y = torch.zeros(x.shape[0], w_out.shape[-1], dtype=torch.float64)
    for t in range(x.shape[0]):
        for j in range(routing.top_k_indices.shape[1]):
            e = routing.top_k_indices[t, j].item()
            h = x[t].double() @ w_in[e]
            y[t] += routing.top_k_gates[t, j].double() * (activation(h) @ w_out[e])
    return y


@pytest.mark.parametrize("num_experts, k", [(6, 2), (4, 4), (5, 1)])
def test_moe_forward_and_grads_match_loop(num_experts, k):
    torch.manual_seed(2)
    moe = MoE(12, 20, num_experts, k, activation=F.gelu, gating_size=6).double().float()
    x = torch.randn(2, 7, 12, requires_grad=True)
    y, aux = moe(x)
    routing = moe.gate(x.reshape(-1, 12))
    ref = naive_moe(moe, x.detach().reshape(-1, 12), routing, F.gelu).view(2, 7, 12)
    torch.testing.assert_close(y.double(), ref, atol=1e-5, rtol=1e-5)
    assert aux is not None and torch.isfinite(aux)
    # Expert-weight gradients against the float64 loop run through autograd (gates held fixed: the router's own
    # gradient path is plain torch autograd).
    y.square().sum().backward()
    grads = [moe.experts.weight.grad, moe.output_experts.weight.grad]
    x64 = x.detach().double().requires_grad_()
    w_in = moe.experts.weight.detach().double().requires_grad_()
    w_out = moe.output_experts.weight.detach().double().requires_grad_()
    flat = x64.reshape(-1, 12)
    rows = []
    for t in range(flat.shape[0]):
        acc = 0
        for j in range(k):
            e = routing.top_k_indices[t, j].item()
            acc = acc + routing.top_k_gates[t, j].detach().double() * (F.gelu(flat[t] @ w_in[e]) @ w_out[e])
        rows.append(acc)
    out = torch.stack(rows)
    out.square().sum().backward()
    for got, want in zip(grads, [w_in.grad, w_out.grad]):
        torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-4)


def test_map_reduce_match_loop():
    torch.manual_seed(3)
    moe = MoE(10, 8, num_experts=5, top_k=2, gating_size=4)
    x = torch.randn(3, 4, 10)
    q, aux, routing, plan = moe.map(x)
    assert q.shape == (3, 4, 2, 8)
    flat = x.reshape(-1, 10).double()
    w_in, w_out = moe.experts.weight.double(), moe.output_experts.weight.double()
    ref_q = torch.stack([
        torch.stack([flat[t] @ w_in[routing.top_k_indices[t, j]] for j in range(2)]) for t in range(12)
    ]).view(3, 4, 2, 8)
    torch.testing.assert_close(q.double(), ref_q, atol=1e-6, rtol=1e-5)
    o = torch.randn(3, 4, 2, 8)
    y = moe.reduce(o, routing, plan)
    of = o.reshape(12, 2, 8).double()
    ref_y = torch.stack([
        sum(routing.top_k_gates[t, j].double() * (of[t, j] @ w_out[routing.top_k_indices[t, j]]) for j in range(2))
        for t in range(12)
    ]).view(3, 4, 10)
    torch.testing.assert_close(y.double(), ref_y, atol=1e-6, rtol=1e-5)


def test_moe_with_expert_bias_matches_loop():
    torch.manual_seed(4)
    moe = MoE(6, 5, num_experts=3, top_k=2, bias=True, activation=torch.relu, gating_size=4)
    x = torch.randn(1, 5, 6)
    y, _ = moe(x)
    routing = moe.gate(x.reshape(-1, 6))
    ref = torch.zeros(5, 6, dtype=torch.float64)
    for t in range(5):
        for j in range(2):
            e = routing.top_k_indices[t, j].item()
            h = torch.relu(x[0, t].double() @ moe.experts.weight[e].double() + moe.experts.bias[e].double())
            out = h @ moe.output_experts.weight[e].double() + moe.output_experts.bias[e].double()
            ref[t] += routing.top_k_gates[t, j].double() * out
    torch.testing.assert_close(y[0].double(), ref, atol=1e-6, rtol=1e-5)


def test_acc_aux_loss_is_rejected():
    with pytest.raises(ValueError, match="acc_aux_loss"):
        MoE(4, 4, 2, 1, acc_aux_loss=True)
