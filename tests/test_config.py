"""ModuleFormerConfig: IBM's field names and defaults, HF aliases, validation errors, save/load round trip."""
import pytest

from moduleformer_exit import ModuleFormerConfig

# IBM's ModuleFormerConfig.__init__ defaults (moduleformer-architecture.md section 1), written out by hand.
IBM_DEFAULTS = dict(
    vocab_size=50295, block_size=512, history_length=512, n_embd=1024, n_layer=24, n_head=8, att_hidden=512,
    ffd_hidden=2048, activation_function="gelu_new", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    moe_pdrop=0.0, sample_topk=0, gating_size=256, n_att_experts=32, k_att=2, n_mlp_experts=32, k_mlp=2,
    layer_norm_epsilon=1e-5, initializer_range=0.02, use_cache=True, bos_token_id=50256, eos_token_id=50256,
    tie_word_embeddings=False, aux_loss_type="mi", aux_loss_weight=0, gate_type="mlp",
)


def test_defaults_match_ibm():
    config = ModuleFormerConfig()
    for name, value in IBM_DEFAULTS.items():
        assert getattr(config, name) == value, name
    assert config.model_type == "moduleformer"
    assert config.n_ctx == 512 * 24


def test_hf_aliases_read_and_write():
    config = ModuleFormerConfig(hidden_size=64, num_hidden_layers=3, num_attention_heads=4)
    assert (config.n_embd, config.n_layer, config.n_head) == (64, 3, 4)
    assert config.hidden_size == 64 and config.num_hidden_layers == 3 and config.num_attention_heads == 4
    assert config.intermediate_size == config.ffd_hidden
    assert config.head_size == 512 // 4


def test_save_load_round_trip(tmp_path):
    config = ModuleFormerConfig(n_embd=48, k_att=1, gate_type="gmm", aux_loss_type="switch", sample_topk=1)
    config.save_pretrained(tmp_path)
    loaded = ModuleFormerConfig.from_pretrained(tmp_path)
    for name in list(IBM_DEFAULTS) + ["kernel_backend"]:
        assert getattr(loaded, name) == getattr(config, name), name


def test_loads_ibm_style_config_json(tmp_path):
    # A config.json as IBM's code writes it (n_ctx included, no kernel_backend).
    (tmp_path / "config.json").write_text(
        '{"model_type": "moduleformer", "architectures": ["ModuleFormerForCausalLM"], "n_ctx": 12288, '
        '"n_embd": 64, "n_layer": 2, "att_hidden": 32, "n_head": 4, "k_att": 2, "n_att_experts": 16, '
        '"aux_loss_type": "mi", "gate_type": "mlp", "history_length": 512, "vocab_size": 100}'
    )
    config = ModuleFormerConfig.from_pretrained(tmp_path)
    assert config.n_att_experts == 16 and config.kernel_backend == "auto" and config.n_ctx == 512 * 2


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(k_att=5, n_att_experts=4), "k_att"),
        (dict(k_mlp=9, n_mlp_experts=8), "k_mlp"),
        (dict(att_hidden=30, n_head=4), "divisible"),
        (dict(gate_type="softmax"), "gate_type"),
        (dict(aux_loss_type="entropy"), "aux_loss_type"),
        (dict(activation_function="swishy"), "activation_function"),
        (dict(n_embd=0), "n_embd"),
        (dict(n_layer=-1), "n_layer"),
        (dict(ffd_hidden=2.5), "ffd_hidden"),
        (dict(sample_topk=3, k_att=2), "sample_topk"),
        (dict(resid_pdrop=1.0), "resid_pdrop"),
        (dict(aux_loss_weight=-0.1), "aux_loss_weight"),
        (dict(kernel_backend="cuda-magic"), "kernel_backend"),
    ],
)
def test_invalid_values_raise_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ModuleFormerConfig(**kwargs)
