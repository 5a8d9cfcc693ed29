"""Parameter and FLOP accounting of a ModuleFormer: pure functions of a ``ModuleFormerConfig`` (no model is built).

Counts follow the modules exactly (``modeling.py``, ``attention.py``, ``moe.py``, ``gates.py``), for the causal-LM
model (``ModuleFormerForCausalLM``: ``transformer.wte``, ``transformer.h.*``, ``transformer.ln_f``, ``lm_head``). Per
block, with width d, attention-expert width a, MLP-expert width f, E_a / E_m experts (per layer: pruned models have
one count per layer) and router width g:

- ``ln_1``, ``ln_2``: 2d each (weight + bias);
- ``attn.q_proj``: query experts ``[E_a, d, a]`` and output experts ``[E_a, a, d]`` (no bias), plus a router;
- ``attn.k_proj`` / ``attn.v_proj``: ``Linear(d, a)`` with bias each, or nothing when they are ``Identity``
  (``att_hidden == n_embd`` and ``n_head == 1``);
- ``mlpf``: experts ``[E_m, d, f]`` and ``[E_m, f, d]`` (no bias), plus a router;
- router of E experts: ``mlp`` = Linear(d, g) + bias and Linear(g, E) (no bias); ``linear`` = Linear(d, E) (no
  bias); ``gmm`` = Linear(d, g) (no bias), centroids ``[E, g]`` and a scalar temperature.

"Active" parameters are those one token's forward pass reads: the k_att / k_mlp selected experts of each layer (not
all of them), every router (the router scores all experts), the shared K/V projections, the norms, and the embedding
table and LM head (counted whole, as is usual, although a token reads one embedding row).
"""
from __future__ import annotations

from .configuration import ModuleFormerConfig


def _router_params(config: ModuleFormerConfig, num_experts: int) -> int:
    """Parameters of one ``TopKGating`` router over ``num_experts`` experts."""
    d, g = config.n_embd, config.gating_size
    if config.gate_type == "mlp":
        return d * g + g + g * num_experts
    if config.gate_type == "linear":
        return d * num_experts
    return d * g + num_experts * g + 1  # gmm: projection, centroids, temperature


def _kv_identity(config: ModuleFormerConfig) -> bool:
    """True when ``k_proj`` / ``v_proj`` are ``nn.Identity`` (no parameters, no FLOPs)."""
    return config.att_hidden == config.n_embd and config.n_head == 1


def parameter_counts(config: ModuleFormerConfig) -> dict[str, int]:
    """Parameter counts of ``ModuleFormerForCausalLM(config)``, computed from the config alone.

    Returns a dict of ints:
        ``total``: every parameter (a tied LM head is counted once);
        ``embedding``: ``wte`` + ``lm_head`` (``vocab_size * n_embd`` each; once if ``tie_word_embeddings``);
        ``non_embedding``: ``total - embedding`` (blocks + final norm);
        ``active``: the parameters one token reads (see the module docstring);
        ``active_non_embedding``: ``active - embedding``;
        ``attention_experts`` / ``mlp_experts`` / ``routers`` / ``kv`` / ``norms``: the parts of ``non_embedding``.
    """
    d, a, f = config.n_embd, config.att_hidden, config.ffd_hidden
    n_layer = config.n_layer
    embedding = config.vocab_size * d * (1 if config.tie_word_embeddings else 2)
    att_expert = 2 * d * a  # one attention expert: query map [d, a] + output map [a, d]
    mlp_expert = 2 * d * f
    att_counts = [config.att_experts_at(i) for i in range(n_layer)]  # per-layer counts (pruned models)
    mlp_counts = [config.mlp_experts_at(i) for i in range(n_layer)]
    routers = sum(_router_params(config, e_att) + _router_params(config, e_mlp)
                  for e_att, e_mlp in zip(att_counts, mlp_counts))
    kv = 0 if _kv_identity(config) else n_layer * 2 * (d * a + a)
    norms = n_layer * 4 * d + 2 * d  # ln_1 + ln_2 per block, ln_f
    attention_experts = sum(att_counts) * att_expert
    mlp_experts = sum(mlp_counts) * mlp_expert
    non_embedding = attention_experts + mlp_experts + routers + kv + norms
    active_non_embedding = (n_layer * (config.k_att * att_expert + config.k_mlp * mlp_expert)
                            + routers + kv + norms)
    return {
        "total": embedding + non_embedding,
        "embedding": embedding,
        "non_embedding": non_embedding,
        "active": embedding + active_non_embedding,
        "active_non_embedding": active_non_embedding,
        "attention_experts": attention_experts,
        "mlp_experts": mlp_experts,
        "routers": routers,
        "kv": kv,
        "norms": norms,
    }


def _router_macs(config: ModuleFormerConfig, num_experts: int) -> int:
    d, g = config.n_embd, config.gating_size
    if config.gate_type == "linear":
        return d * num_experts
    return d * g + g * num_experts  # mlp: two matmuls; gmm: projection + cosine against the centroids


def flops_per_token(config: ModuleFormerConfig, context_length: int) -> dict[str, int]:
    """Forward and training FLOPs of one token that attends over ``context_length`` keys (itself included).

    Forward FLOPs are 2 x the multiply-adds of the active path: routers, the k_att query / output experts, K/V
    projections, attention (``QK^T`` and ``AV``: ``2 * k_att * att_hidden * context_length`` multiply-adds per layer)
    and the k_mlp MLP experts, plus the LM head; norms, activations and softmaxes are ignored. For a causal sequence
    of length T the mean context is ``(T + 1) / 2``.

    Returns a dict of ints: ``forward``, ``forward_attention`` (the attention-score part of ``forward``),
    ``training`` (= 3 x ``forward``: backward costs twice the forward) and ``training_6n`` (Kaplan et al.'s
    ``6 N`` with N = active non-embedding parameters, attention and LM head excluded).
    """
    if isinstance(context_length, bool) or not isinstance(context_length, int) or context_length < 1:
        raise ValueError(f"context_length must be a positive integer (keys a token attends to), got {context_length!r}")
    d, a, f = config.n_embd, config.att_hidden, config.ffd_hidden
    kv_macs = 0 if _kv_identity(config) else 2 * d * a
    routers = sum(_router_macs(config, config.att_experts_at(i)) + _router_macs(config, config.mlp_experts_at(i))
                  for i in range(config.n_layer))
    per_layer = config.k_att * 2 * d * a + kv_macs + config.k_mlp * 2 * d * f
    attention_macs = config.n_layer * 2 * config.k_att * a * context_length
    forward = 2 * (config.n_layer * per_layer + routers + attention_macs + d * config.vocab_size)
    return {
        "forward": forward,
        "forward_attention": 2 * attention_macs,
        "training": 3 * forward,
        "training_6n": 6 * parameter_counts(config)["active_non_embedding"],
    }
