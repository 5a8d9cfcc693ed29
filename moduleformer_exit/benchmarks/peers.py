"""ModuleFormer against transformers' JetMoE (the HF-native mixture-of-attention + MoE peer) at matched shapes.

Both models: width 512, 8 layers, 8 attention experts top-2 with 4 heads of 64 (shared K/V), 8 MLP experts top-2,
linear routers, untied embeddings, vocabulary 8192, fp32. JetMoE's MLP experts are GLU (3 matrices of d x I) and ours
are plain (2 matrices of d x f), so ``f = 1.5 * I`` gives equal active (and total, ~125M) parameters.

Workloads (one process, the two models interleaved, fastest of ``repeats``): prefill (no-grad forward of
``[batch, prefill_len]``), a training step (forward + backward + AdamW step on ``[batch, train_len]`` with labels)
and greedy decode (``generate`` with the KV cache). Rows give each side's time and ``ours / JetMoE`` throughput
(> 1: ModuleFormer is faster).
"""
from __future__ import annotations


import torch

from ..configuration import ModuleFormerConfig
from ..modeling import ModuleFormerForCausalLM
from .timing import fastest_ms

__all__ = ["peer_configs", "bench_peers", "PEERS_COLUMNS"]

PEERS_COLUMNS = [("workload", ""), ("shape", ""), ("ours_ms", ".1f"), ("jetmoe_ms", ".1f"), ("ours_over_jetmoe", ".2f"),
                 ("ours_params_m", ".1f"), ("jetmoe_params_m", ".1f")]


def peer_configs(width: int = 512, layers: int = 8, experts: int = 8, top_k: int = 2, heads: int = 4,
                 head_dim: int = 64, jet_intermediate: int = 1024, vocab: int = 8192):
    """``(ModuleFormerConfig, JetMoeConfig)`` with equal active parameters (see the module docstring)."""
    from transformers import JetMoeConfig

    ours = ModuleFormerConfig(
        vocab_size=vocab, n_embd=width, n_layer=layers, n_head=heads, att_hidden=heads * head_dim,
        ffd_hidden=jet_intermediate * 3 // 2, n_att_experts=experts, k_att=top_k, n_mlp_experts=experts, k_mlp=top_k,
        gate_type="linear", block_size=1024, history_length=1024, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    jet = JetMoeConfig(
        vocab_size=vocab, hidden_size=width, num_hidden_layers=layers, num_key_value_heads=heads, kv_channels=head_dim,
        intermediate_size=jet_intermediate, num_local_experts=experts, num_experts_per_tok=top_k,
        tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    return ours, jet


def bench_peers(batch: int = 2, prefill_len: int = 256, train_len: int = 128, prompt_len: int = 32,
                new_tokens: int = 16, threads: int = 2, repeats: int = 3, quick: bool = False) -> list[dict]:
    """Rows ``workload, shape, ours_ms, jetmoe_ms, ours_over_jetmoe`` (throughput ratio) and parameter counts.

    ``quick``: a 2-layer width-128 pair and tiny inputs (checks the command runs, not speed)."""
    from transformers import JetMoeForCausalLM

    old_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        if quick:
            ours_cfg, jet_cfg = peer_configs(width=128, layers=2, heads=2, head_dim=32, jet_intermediate=128,
                                             vocab=512)
            batch, prefill_len, train_len, prompt_len, new_tokens, repeats = 1, 16, 16, 4, 3, 1
        else:
            ours_cfg, jet_cfg = peer_configs()
        torch.manual_seed(0)
        models = {"ours": ModuleFormerForCausalLM(ours_cfg), "jetmoe": JetMoeForCausalLM(jet_cfg)}
        params = {name: sum(p.numel() for p in m.parameters()) / 1e6 for name, m in models.items()}
        vocab = ours_cfg.vocab_size
        gen = torch.Generator().manual_seed(0)
        prefill_ids = torch.randint(3, vocab, (batch, prefill_len), generator=gen)
        train_ids = torch.randint(3, vocab, (batch, train_len), generator=gen)
        prompt = torch.randint(3, vocab, (1, prompt_len), generator=gen)
        optimizers = {name: torch.optim.AdamW(m.parameters(), lr=1e-4) for name, m in models.items()}

        def prefill(m):
            def run():
                m.eval()
                with torch.inference_mode():
                    m(prefill_ids, use_cache=False)
            return run

        def train_step(name, m):
            def run():
                m.train()
                optimizers[name].zero_grad(set_to_none=True)
                m(train_ids, labels=train_ids, use_cache=False).loss.backward()
                optimizers[name].step()
            return run

        def decode(m):
            def run():
                m.eval()
                with torch.inference_mode():
                    m.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                               pad_token_id=0)
            return run

        workloads = {
            "prefill": (f"{batch}x{prefill_len}", {n: prefill(m) for n, m in models.items()}),
            "training step": (f"{batch}x{train_len}", {n: train_step(n, m) for n, m in models.items()}),
            "greedy decode": (f"1x{prompt_len}+{new_tokens}", {n: decode(m) for n, m in models.items()}),
        }
        rows = []
        for workload, (shape, fns) in workloads.items():
            best = fastest_ms(fns, repeats)
            rows.append(dict(workload=workload, shape=shape, ours_ms=best["ours"], jetmoe_ms=best["jetmoe"],
                             ours_over_jetmoe=best["jetmoe"] / best["ours"], ours_params_m=params["ours"],
                             jetmoe_params_m=params["jetmoe"]))
        return rows
    finally:
        torch.set_num_threads(old_threads)
