"""Test-only worker for tests/test_expert_parallel.py, started on 2 gloo ranks by torchrun:

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/helpers/expert_parallel_worker.py OUT

1. ``layers``: :class:`ExpertParallelMoE` (MLP ``forward``, attention ``map`` -> ``reduce``) against the unsharded
   :class:`MoE` in float64, outputs and every gradient, under uneven routing forced by a router hook (rank 0 sends
   nothing to rank 1; an expert receives nothing; a rank receives no row at all).
2. ``training``: DeepSpeed, ZeRO-1 and ZeRO-2, the tiny recipe's model (fp32, gradient clipping on), EP=1 and EP=2
   on the same per-rank batches for 3 steps: losses and full gradients (experts gathered) each step; a router
   hook keeps two MLP experts of layer 0 without tokens on rank 0 and attention expert 0 of layer 1 without tokens
   everywhere. After the steps, both engines export ``final``-style checkpoints (``export_model``) to OUT/zero<S>_ep<P>.

Adam's first steps move a weight by about lr * sign(g): with eps 1e-8, weights whose gradient is zero up to fp32
rounding (~1e-8) would differ by up to lr between two correct runs, so the recipe uses eps 1e-6 and lr 3e-4, and a
clipping threshold below the gradient norm (clipping active). Rank 0 writes OUT/results.json (numbers only); the
test asserts on them.
"""
import copy
import json
import os
import sys
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from moduleformer_exit.expert_parallel import ExpertParallelMoE, expert_parallel_layers
from moduleformer_exit.moe import MoE
from moduleformer_exit.training.distributed import init_deepspeed_distributed

OUT = sys.argv[1]
MASK = 1e4  # subtracted from a router logit: the expert's probability underflows, top-k never picks it


def mask_experts(gate_module, experts):
    """Forward hook on a router's logit layer: ``experts`` never win the top-k (hook applied alike with EP=1/2)."""
    def hook(module, args, out):
        shift = torch.zeros(out.shape[-1], dtype=out.dtype)
        shift[list(experts)] = MASK
        return out - shift
    return gate_module.register_forward_hook(hook) if experts else None


def rel_err(a, b):
    a = torch.zeros_like(b) if a is None else a  # a gradient that never arrived counts as zero
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


# ----------------------------------------------------------------------------------------------- 1. layers
def check_layers(dist, rank, world):
    results = {}
    cases = {"random": ({}, {}), "rank0_sends_nothing_to_rank1": ({0: (2, 3)}, {1: (0,)}),
             "rank1_receives_nothing": ({0: (2, 3), 1: (2, 3)}, {0: (2, 3), 1: (2, 3)})}
    for case, (mlp_masks, att_masks) in cases.items():
        torch.manual_seed(0)
        mlp = MoE(8, 12, 4, 2, activation=F.gelu, gating_size=6).double()
        att = MoE(8, 6, 4, 2, gating_size=6).double()  # attention experts: q map 8 -> 6, output 6 -> 8
        ep_mlp = ExpertParallelMoE.from_moe(copy.deepcopy(mlp), torch.distributed.group.WORLD, world, rank)
        ep_att = ExpertParallelMoE.from_moe(copy.deepcopy(att), torch.distributed.group.WORLD, world, rank)
        g = torch.Generator().manual_seed(1)
        xs = torch.randn(world, 3, 5, 8, generator=g, dtype=torch.float64)  # every rank's tokens
        ws = torch.randn(world, 3, 5, 8, generator=g, dtype=torch.float64)  # every rank's loss weights
        qs = torch.randn(world, 3, 5, 2, 6, generator=g, dtype=torch.float64)  # stand-in for attention mixing

        def loss_of(mlp_layer, att_layer, x, w, qw):
            y, _ = mlp_layer(x)
            q, _, routing, plan = att_layer.map(x)
            o = att_layer.reduce(q * qw, routing, plan)  # uses map's routing and plan, as attention does
            return (y * w).sum() + (o * w).sum() + q.square().sum()

        # EP: this rank's tokens only
        hooks = [mask_experts(ep_mlp.gate.w_gate, mlp_masks.get(rank, ())),
                 mask_experts(ep_att.gate.w_gate, att_masks.get(rank, ()))]
        x = xs[rank].clone().requires_grad_()
        y_ep, _, mlp_routing = ep_mlp(x, return_routing=True)
        q_ep, _, routing, plan = ep_att.map(x)
        o_ep = ep_att.reduce(q_ep * qs[rank], routing, plan)
        loss = (y_ep * ws[rank]).sum() + (o_ep * ws[rank]).sum() + q_ep.square().sum()
        loss.backward()
        sizes = (plan.send_splits, plan.recv_splits)
        mlp_experts_used = sorted(set(mlp_routing.top_k_indices.flatten().tolist()))
        att_experts_used = sorted(set(routing.top_k_indices.flatten().tolist()))
        for h in hooks:
            if h is not None:
                h.remove()
        # reference: the unsharded layers on every rank's tokens (each rank's own masks), one loss summed over ranks
        x_ref = xs.clone().requires_grad_()
        total, outs = 0.0, {}
        for r in range(world):
            hooks = [mask_experts(mlp.gate.w_gate, mlp_masks.get(r, ())),
                     mask_experts(att.gate.w_gate, att_masks.get(r, ()))]
            y, _ = mlp(x_ref[r])
            q, _, rt, pl = att.map(x_ref[r])
            o = att.reduce(q * qs[r], rt, pl)
            outs[r] = (y, q, o)
            total = total + (y * ws[r]).sum() + (o * ws[r]).sum() + q.square().sum()
            for h in hooks:
                if h is not None:
                    h.remove()
        total.backward()
        local = slice(rank * 2, rank * 2 + 2)
        y_ref, q_ref, o_ref = outs[rank]
        errs = {
            "mlp_out": rel_err(y_ep, y_ref), "att_q": rel_err(q_ep, q_ref), "att_out": rel_err(o_ep, o_ref),
            "x_grad": rel_err(x.grad, x_ref.grad[rank]),
            "mlp_w_in_grad": rel_err(ep_mlp.experts.weight.grad, mlp.experts.weight.grad[local]),
            "mlp_w_out_grad": rel_err(ep_mlp.output_experts.weight.grad, mlp.output_experts.weight.grad[local]),
            "att_w_q_grad": rel_err(ep_att.experts.weight.grad, att.experts.weight.grad[local]),
            "att_w_o_grad": rel_err(ep_att.output_experts.weight.grad, att.output_experts.weight.grad[local]),
        }
        # the router only sees this rank's tokens: its gradient is this rank's part of the reference's
        own = [p.grad for p in ep_mlp.gate.parameters()] + [p.grad for p in ep_att.gate.parameters()]
        for p in list(mlp.gate.parameters()) + list(att.gate.parameters()):
            p.grad = None
        hooks = [mask_experts(mlp.gate.w_gate, mlp_masks.get(rank, ())),
                 mask_experts(att.gate.w_gate, att_masks.get(rank, ()))]
        x1 = xs[rank].clone().requires_grad_()
        y, _ = mlp(x1)
        q, _, rt, pl = att.map(x1)
        ((y * ws[rank]).sum() + (att.reduce(q * qs[rank], rt, pl) * ws[rank]).sum() + q.square().sum()).backward()
        ref_gate = [p.grad for p in mlp.gate.parameters()] + [p.grad for p in att.gate.parameters()]
        errs["gate_grad"] = max(rel_err(a, b) for a, b in zip(own, ref_gate))
        results[case] = {"errors": errs, "att_send_splits": sizes[0], "att_recv_splits": sizes[1],
                         "mlp_experts_used": mlp_experts_used, "att_experts_used": att_experts_used}
    return results


# ----------------------------------------------------------------------------------------------- 2. training
def full_grads(engine, deepspeed, dist):
    """{name: full gradient} after backward: ZeRO partitions gathered, expert shards all-gathered over EP."""
    from deepspeed.utils import safe_get_full_grad

    experts = {f"{n}.{s}.weight": layer for n, layer in expert_parallel_layers(engine.module)
               for s in ("experts", "output_experts")}
    grads = {}
    for name, p in engine.module.named_parameters():
        g = safe_get_full_grad(p).detach().clone()
        if name in experts:
            layer = experts[name]
            parts = [torch.empty_like(g) for _ in range(layer.ep_size)]
            dist.all_gather(parts, g, group=layer.group)
            g = torch.cat(parts)
        grads[name] = g
    return grads


def train_case(deepspeed, dist, rank, stage, ep):
    from moduleformer_exit.training.expert_parallel import enable_expert_parallel
    from moduleformer_exit.training.pretrain import build_model, export_model, init_engine
    from moduleformer_exit.training.recipe import load_recipe

    recipe = load_recipe("tiny", [f"deepspeed.zero_optimization.stage={stage}", f"deepspeed.ep_size={ep}",
                                  "deepspeed.gradient_accumulation_steps=1", "deepspeed.gradient_clipping=0.1",
                                  "training.warmup_steps=1", "training.lr=3e-4", "training.eps=1e-6"])
    ids = SimpleNamespace(bos_token_id=1, eos_token_id=2, pad_token_id=0)
    model = build_model(recipe, 300, recipe["training"]["seed"], ids)
    if ep > 1:
        enable_expert_parallel(model, ep)
    blocks = dict(model.named_modules())
    mask_experts(blocks["transformer.h.0.mlpf"].gate.w_gate, (2, 3) if rank == 0 else ())
    mask_experts(blocks["transformer.h.1.attn.q_proj"].gate.w_gate, (0,))
    engine, _ = init_engine(deepspeed, model, recipe, dist.get_world_size())
    engine.train()
    losses, grads, norms = [], [], []
    for step in range(3):
        x = torch.randint(0, 300, (4, 32), generator=torch.Generator().manual_seed(100 * step + rank))
        out = engine(input_ids=x, labels=x)
        engine.backward(out.loss)
        grads.append(full_grads(engine, deepspeed, dist))
        engine.step()
        norms.append(float(engine.get_global_grad_norm()))  # the clipping norm: every expert of every rank
        loss = out.loss.detach().clone()
        dist.all_reduce(loss)
        losses.append(float(loss) / dist.get_world_size())
    tokenizer = SimpleNamespace(save_pretrained=lambda path: None)  # the export's tokenizer: not under test here
    export_model(engine, os.path.join(OUT, f"zero{stage}_ep{ep}"), tokenizer, dist)
    return losses, grads, norms, engine


def check_training(deepspeed, dist, rank):
    results = {}
    for stage in (1, 2):
        base_losses, base_grads, base_norms, _ = train_case(deepspeed, dist, rank, stage, 1)
        ep_losses, ep_grads, ep_norms, engine = train_case(deepspeed, dist, rank, stage, 2)
        grad_errs = [max(rel_err(g[n], b[n]) for n in b) for g, b in zip(ep_grads, base_grads)]
        norm_errs = [max(float((g[n] - b[n]).norm() / b[n].norm().clamp_min(1e-30)) for n in b)
                     for g, b in zip(ep_grads, base_grads)]
        worst = max(base_grads[-1], key=lambda n: rel_err(ep_grads[-1][n], base_grads[-1][n]))
        empty = "transformer.h.1.attn.q_proj.experts.weight"
        results[f"zero{stage}"] = {
            "ep1_losses": base_losses, "ep2_losses": ep_losses, "grad_rel_err_per_step": grad_errs,
            "grad_norm_rel_err_per_step": norm_errs,
            "worst_param_last_step": worst, "n_params_compared": len(base_grads[0]),
            "empty_expert_grad_max": float(max(g[empty][0].abs().max() for g in ep_grads)),
            "empty_expert_grad_max_ep1": float(max(g[empty][0].abs().max() for g in base_grads)),
            "ep1_grad_norms": base_norms, "ep2_grad_norms": ep_norms,
            "local_expert_shape": list(dict(engine.module.named_parameters())[empty].shape),
            "moe_groups": sum(1 for g in engine.optimizer.optimizer.param_groups if g.get("moe")),
        }
    return results


def main():
    deepspeed = init_deepspeed_distributed()
    import deepspeed.comm as dist

    torch.set_num_threads(1)
    rank, world = dist.get_rank(), dist.get_world_size()
    # a failure raises: torchrun then stops the other rank too (no rank left waiting in a collective)
    results = {"layers": check_layers(dist, rank, world), "training": check_training(deepspeed, dist, rank)}
    gathered = [None] * world
    dist.all_gather_object(gathered, results)
    if rank == 0:
        with open(os.path.join(OUT, "results.json"), "w") as f:
            json.dump({"rank0": gathered[0], "rank1": gathered[1]}, f, indent=1)
    dist.barrier()


if __name__ == "__main__":
    main()
