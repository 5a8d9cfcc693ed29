"""accounting.parameter_counts / flops_per_token against real built models, gradients and hand-computed values."""
import pytest
import torch

from moduleformer_exit import ModuleFormerConfig, ModuleFormerForCausalLM
from moduleformer_exit.accounting import flops_per_token, parameter_counts

BASE = dict(vocab_size=37, n_embd=12, n_layer=2, n_head=2, att_hidden=8, ffd_hidden=10, n_att_experts=5, k_att=2,
            n_mlp_experts=6, k_mlp=3, gating_size=4, kernel_backend="torch", bos_token_id=1, eos_token_id=2)
VARIANTS = {
    "mlp-gate": {},
    "linear-gate": {"gate_type": "linear"},
    "gmm-gate": {"gate_type": "gmm"},
    "identity-kv": {"att_hidden": 12, "n_head": 1},
    "tied": {"tie_word_embeddings": True},
}


def _groups(model) -> dict[str, int]:
    """Reference: numel of the built model's (deduplicated) parameters, grouped by parameter name."""
    out = {"embedding": 0, "attention_experts": 0, "mlp_experts": 0, "routers": 0, "kv": 0, "norms": 0}
    for name, p in model.named_parameters():  # tied parameters appear once
        if name in ("transformer.wte.weight", "lm_head.weight"):
            key = "embedding"
        elif ".gate." in name:
            key = "routers"
        elif "attn.q_proj" in name:
            key = "attention_experts"
        elif "mlpf" in name:
            key = "mlp_experts"
        elif "k_proj" in name or "v_proj" in name:
            key = "kv"
        elif "ln_" in name:
            key = "norms"
        else:
            raise AssertionError(f"unexpected parameter {name}")
        out[key] += p.numel()
    return out


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_counts_match_built_model(variant):
    config = ModuleFormerConfig(**{**BASE, **VARIANTS[variant]})
    model = ModuleFormerForCausalLM(config)
    groups = _groups(model)
    counts = parameter_counts(config)
    for key, value in groups.items():
        assert counts[key] == value, key
    assert counts["total"] == sum(p.numel() for p in model.parameters())
    assert counts["non_embedding"] == counts["total"] - groups["embedding"]


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_active_matches_parameters_one_token_touches(variant):
    """Independent reference: the parameter entries with a non-zero gradient after one token's forward/backward.

    The token reads one embedding row (the table itself is counted whole by the accounting), all of the LM head, and
    only the selected experts' slices of the expert tensors.
    """
    torch.manual_seed(0)
    config = ModuleFormerConfig(**{**BASE, **VARIANTS[variant]})
    model = ModuleFormerForCausalLM(config).double().eval()
    with torch.no_grad():  # random norms/biases so no gradient is zero by construction
        for name, p in model.named_parameters():
            if "ln_" in name or name.endswith("bias") or "temperature" in name:
                p.uniform_(0.5, 1.5)
    logits = model(torch.tensor([[3]])).logits
    (logits * torch.randn_like(logits)).sum().backward()
    touched = {name: int((p.grad != 0).sum()) for name, p in model.named_parameters()}
    wte_row = config.n_embd
    if config.tie_word_embeddings:  # the shared table gets the head's full gradient
        non_embedding_touched = sum(v for k, v in touched.items() if k != "transformer.wte.weight")
    else:
        assert touched["transformer.wte.weight"] == wte_row
        non_embedding_touched = sum(v for k, v in touched.items()
                                    if k not in ("transformer.wte.weight", "lm_head.weight"))
    counts = parameter_counts(config)
    assert counts["active_non_embedding"] == non_embedding_touched
    assert counts["active"] == counts["active_non_embedding"] + counts["embedding"]


def test_hand_computed_counts():
    """BASE by hand: d=12, a=8, f=10, E_a=5, k_att=2, E_m=6, k_mlp=3, g=4, V=37, 2 layers, mlp gates."""
    counts = parameter_counts(ModuleFormerConfig(**BASE))
    att_router = 12 * 4 + 4 + 4 * 5  # 72
    mlp_router = 12 * 4 + 4 + 4 * 6  # 76
    kv = 2 * (12 * 8 + 8)  # 208
    norms_per_layer = 4 * 12  # 48
    active_layer = 2 * (2 * 12 * 8) + 3 * (2 * 12 * 10) + att_router + mlp_router + kv + norms_per_layer
    assert active_layer == 384 + 720 + 72 + 76 + 208 + 48 == 1508
    assert counts["active_non_embedding"] == 2 * 1508 + 24 == 3040
    assert counts["active"] == 3040 + 2 * 37 * 12 == 3928
    total_layer = 5 * (2 * 12 * 8) + 6 * (2 * 12 * 10) + att_router + mlp_router + kv + norms_per_layer
    assert counts["non_embedding"] == 2 * total_layer + 24 == 2 * (960 + 1440 + 404) + 24 == 5632


def test_flops_hand_computed_and_attention_grows_with_context():
    config = ModuleFormerConfig(**BASE)
    # per layer MACs: routers (12*4+4*5) + (12*4+4*6) = 140; q/o experts 2*2*12*8 = 384; kv 2*12*8 = 192;
    # mlp experts 3*2*12*10 = 720 -> 1436; attention 2*k_att*a*S = 32*S; head 12*37 = 444.
    for context in (1, 7):
        flops = flops_per_token(config, context)
        assert flops["forward"] == 2 * (2 * (1436 + 32 * context) + 444)
        assert flops["forward_attention"] == 2 * 2 * 32 * context
        assert flops["training"] == 3 * flops["forward"]
        assert flops["training_6n"] == 6 * 3040
    with pytest.raises(ValueError, match="context_length"):
        flops_per_token(config, 0)


def test_model_methods_expose_the_accounting(tiny_config):
    """``num_parameters(active=...)`` / ``flops_per_token`` on the model agree with a count over its modules."""
    from moduleformer_exit import ModuleFormerForCausalLM

    config = tiny_config()
    model = ModuleFormerForCausalLM(config)
    assert model.num_parameters() == sum(p.numel() for p in model.parameters())
    experts = {n: p for n, p in model.named_parameters() if n.endswith("experts.weight")}
    # every expert tensor [E, in, out] is read for k of its E experts; everything else is read whole
    k_of = {"q_proj": config.k_att, "mlpf": config.k_mlp}
    active = sum(p.numel() for n, p in model.named_parameters() if n not in experts)
    for name, p in experts.items():
        k = k_of["q_proj" if ".q_proj." in name else "mlpf"]
        active += p.numel() // p.shape[0] * k
    assert model.num_parameters(active=True) == active
    embeddings = model.transformer.wte.weight.numel() + model.lm_head.weight.numel()
    assert model.num_parameters(active=True, exclude_embeddings=True) == active - embeddings
    assert model.flops_per_token(16, training=True) == 3 * model.flops_per_token(16)
    with pytest.raises(ValueError, match="only_trainable"):
        model.num_parameters(only_trainable=True, active=True)


def test_counts_follow_per_layer_expert_counts():
    """A pruned model (one expert count per layer) is counted from its real modules."""
    from moduleformer_exit import ModuleFormerForCausalLM

    config = ModuleFormerConfig(vocab_size=50, n_embd=16, n_layer=3, n_head=2, att_hidden=8, ffd_hidden=12,
                                n_att_experts=[4, 3, 2], k_att=2, n_mlp_experts=[5, 2, 3], k_mlp=2, gating_size=8)
    model = ModuleFormerForCausalLM(config)
    counts = parameter_counts(config)
    assert counts["total"] == sum(p.numel() for p in model.parameters())
    experts = sum(p.numel() for n, p in model.named_parameters() if n.endswith("experts.weight"))
    assert counts["attention_experts"] + counts["mlp_experts"] == experts
    routers = sum(p.numel() for n, p in model.named_parameters() if ".gate." in n)
    assert counts["routers"] == routers
