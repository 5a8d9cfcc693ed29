"""ModuleFormerConfig: IBM's ModuleFormer / MoLM configuration (same field names and defaults), validated."""
from __future__ import annotations

import math

from typing import Any

from transformers import PretrainedConfig
from transformers.activations import ACT2FN

GATE_TYPES = ("mlp", "linear", "gmm")
AUX_LOSS_TYPES = ("mi", "switch")
KERNEL_BACKENDS = ("auto", "torch", "triton", "megablocks")


class ModuleFormerConfig(PretrainedConfig):
    """Configuration of a ModuleFormer model (IBM's MoLM checkpoints load it unchanged).

    Every field of IBM's ``ModuleFormerConfig`` is kept with its name and default, so ``config.json`` files written by
    the original code load as they are. Sizes: ``n_embd`` model width, ``n_layer`` blocks, ``n_head`` heads per
    attention expert (head size ``att_hidden // n_head``), ``att_hidden`` width of each attention expert and of the
    shared K/V projections, ``ffd_hidden`` hidden width of each MLP expert. Routing: ``n_att_experts`` / ``k_att``
    attention experts (total / per token), ``n_mlp_experts`` / ``k_mlp`` MLP experts, ``gate_type`` in
    ``mlp|linear|gmm`` with hidden width ``gating_size``, ``sample_topk`` of the k experts sampled in training,
    ``aux_loss_type`` in ``mi|switch`` added to the LM loss with ``aux_loss_weight`` (only if > 0).
    ``n_att_experts`` / ``n_mlp_experts`` are an int (IBM's form: the same count in every layer) or a list with one
    count per layer (pruned models); a list whose counts are all equal is stored as the int, so a uniformly pruned
    checkpoint keeps IBM's form. Read one layer's count with :meth:`att_experts_at` / :meth:`mlp_experts_at`.
    ``block_size`` / ``history_length`` are kept for compatibility only: the context length is not limited (there are
    no position embeddings and the KV cache is never truncated). ``attn_pdrop`` and ``layer_norm_epsilon`` are stored
    but, as in the original, unused (LayerNorms use torch's default eps, which equals the default 1e-5).

    Added here (not in IBM's config): ``output_router_logits`` (default of the forward argument of that name, as in
    Mixtral-style MoE configs) and ``kernel_backend`` selects the expert / attention kernel implementation
    (resolved once per module and device by ``kernels.backend.resolve_backend``): ``auto`` (Triton on CUDA tensors
    when triton imports, else torch), ``torch`` (pure PyTorch, any device), ``triton`` (Triton kernels; on CPU only
    under ``TRITON_INTERPRET=1``), ``megablocks`` (GPU-only MegaBlocks grouped GEMM for the MLP experts; needs
    ``pip install megablocks`` on a CUDA machine; attention falls back to ``auto``). The HF aliases ``hidden_size``,
    ``num_hidden_layers``, ``num_attention_heads``, ``intermediate_size``, ``num_experts`` / ``num_experts_per_tok``
    (MLP experts) read and write the fields above.
    """

    model_type = "moduleformer"
    keys_to_ignore_at_inference = ["past_key_values"]
    attribute_map = {
        "hidden_size": "n_embd",
        "num_attention_heads": "n_head",
        "num_hidden_layers": "n_layer",
        "intermediate_size": "ffd_hidden",
        "num_experts": "n_mlp_experts",
        "num_experts_per_tok": "k_mlp",
    }

    def __init__(
        self,
        vocab_size: int = 50295,
        block_size: int = 512,
        history_length: int = 512,
        n_embd: int = 1024,
        n_layer: int = 24,
        n_head: int = 8,
        att_hidden: int = 512,
        ffd_hidden: int = 2048,
        activation_function: str = "gelu_new",
        resid_pdrop: float = 0.0,
        embd_pdrop: float = 0.0,
        attn_pdrop: float = 0.0,
        moe_pdrop: float = 0.0,
        sample_topk: int = 0,
        gating_size: int = 256,
        n_att_experts: int = 32,
        k_att: int = 2,
        n_mlp_experts: int = 32,
        k_mlp: int = 2,
        layer_norm_epsilon: float = 1e-5,
        initializer_range: float = 0.02,
        use_cache: bool = True,
        bos_token_id: int | None = 50256,
        eos_token_id: int | None = 50256,
        pad_token_id: int | None = None,
        tie_word_embeddings: bool = False,
        aux_loss_type: str = "mi",
        aux_loss_weight: float = 0.0,
        gate_type: str = "mlp",
        kernel_backend: str = "auto",
        output_router_logits: bool = False,
        **kwargs: Any,
    ) -> None:
        self.vocab_size = vocab_size
        self.block_size = block_size
        self.history_length = history_length
        self.n_embd = n_embd
        self.n_layer = n_layer
        self.n_head = n_head
        self.att_hidden = att_hidden
        self.ffd_hidden = ffd_hidden
        self.activation_function = activation_function
        self.resid_pdrop = resid_pdrop
        self.embd_pdrop = embd_pdrop
        self.attn_pdrop = attn_pdrop
        self.moe_pdrop = moe_pdrop
        self.sample_topk = sample_topk
        self.gating_size = gating_size
        self.n_att_experts = n_att_experts
        self.k_att = k_att
        self.n_mlp_experts = n_mlp_experts
        self.k_mlp = k_mlp
        self.layer_norm_epsilon = layer_norm_epsilon
        self.initializer_range = initializer_range
        self.use_cache = use_cache
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id
        self.pad_token_id = pad_token_id
        self.tie_word_embeddings = tie_word_embeddings
        self.aux_loss_type = aux_loss_type
        self.aux_loss_weight = aux_loss_weight
        self.gate_type = gate_type
        self.kernel_backend = kernel_backend
        self.output_router_logits = output_router_logits
        # Saved by IBM's code and read by nothing; kept so round-tripped config.json files stay identical.
        self.n_ctx = history_length * n_layer
        kwargs.pop("n_ctx", None)
        super().__init__(**kwargs)
        self.validate_moduleformer()

    @property
    def head_size(self) -> int:
        """Size of one attention head: ``att_hidden // n_head``."""
        return self.att_hidden // self.n_head

    def att_experts_at(self, layer: int) -> int:
        """Number of attention experts of block ``layer`` (``n_att_experts`` as an int or its ``layer`` entry)."""
        return _count_at(self.n_att_experts, layer)

    def mlp_experts_at(self, layer: int) -> int:
        """Number of MLP experts of block ``layer`` (``n_mlp_experts`` as an int or its ``layer`` entry)."""
        return _count_at(self.n_mlp_experts, layer)

    def set_expert_counts(self, att: int | list[int] | None = None, mlp: int | list[int] | None = None) -> None:
        """Set per-layer (or uniform) expert counts after pruning / extension; uniform lists become ints. Validated."""
        if att is not None:
            self.n_att_experts = att
        if mlp is not None:
            self.n_mlp_experts = mlp
        self.validate_moduleformer()

    def validate_moduleformer(self) -> None:
        """Raise ``ValueError`` naming the field and the fix if the configuration cannot build a model."""
        for name in ("vocab_size", "n_embd", "n_layer", "n_head", "att_hidden", "ffd_hidden", "gating_size",
                     "k_att", "k_mlp"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"ModuleFormerConfig.{name} must be a positive integer, got {value!r}.")
        for name in ("n_att_experts", "n_mlp_experts"):
            counts = getattr(self, name)
            if isinstance(counts, tuple):
                counts = list(counts)
            _check_counts(name, counts, self.n_layer)
            setattr(self, name, _uniform_to_int(counts))
        if self.att_hidden % self.n_head != 0:
            raise ValueError(
                f"ModuleFormerConfig.att_hidden ({self.att_hidden}) must be divisible by n_head ({self.n_head}): "
                f"each attention expert splits att_hidden into n_head heads. Choose att_hidden as a multiple of n_head."
            )
        for k_name, e_name in (("k_att", "n_att_experts"), ("k_mlp", "n_mlp_experts")):
            counts = getattr(self, e_name)
            fewest = min(counts) if isinstance(counts, list) else counts
            if getattr(self, k_name) > fewest:
                where = (f" in layer {counts.index(fewest)}" if isinstance(counts, list) else "")
                raise ValueError(
                    f"ModuleFormerConfig.{k_name} ({getattr(self, k_name)}) is larger than {e_name} "
                    f"({fewest}{where}): a token cannot use more experts than exist. Lower {k_name} or keep at "
                    f"least {k_name} experts in every layer."
                )
        if isinstance(self.sample_topk, bool) or not isinstance(self.sample_topk, int) or self.sample_topk < 0:
            raise ValueError(f"ModuleFormerConfig.sample_topk must be an integer >= 0, got {self.sample_topk!r}.")
        if self.sample_topk > min(self.k_att, self.k_mlp):
            raise ValueError(
                f"ModuleFormerConfig.sample_topk ({self.sample_topk}) must be <= k_att ({self.k_att}) and "
                f"k_mlp ({self.k_mlp}): it is the number of the k selected experts that are sampled in training."
            )
        if self.gate_type not in GATE_TYPES:
            raise ValueError(f"ModuleFormerConfig.gate_type must be one of {GATE_TYPES}, got {self.gate_type!r}.")
        if self.aux_loss_type not in AUX_LOSS_TYPES:
            raise ValueError(
                f"ModuleFormerConfig.aux_loss_type must be one of {AUX_LOSS_TYPES}, got {self.aux_loss_type!r}."
            )
        if self.activation_function not in ACT2FN:
            raise ValueError(
                f"ModuleFormerConfig.activation_function {self.activation_function!r} is not a transformers "
                f"activation; use one of: {', '.join(sorted(ACT2FN))}."
            )
        def is_number(value) -> bool:  # a real, finite number: not a string ("0.1"), a bool or NaN / inf
            return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)

        for name in ("resid_pdrop", "embd_pdrop", "attn_pdrop", "moe_pdrop"):
            value = getattr(self, name)
            if not is_number(value) or not 0.0 <= value < 1.0:
                raise ValueError(f"ModuleFormerConfig.{name} must be a number in [0, 1), got {value!r}"
                                 f"{' (a string: write it without quotes)' if isinstance(value, str) else ''}.")
        if not is_number(self.aux_loss_weight) or self.aux_loss_weight < 0:
            raise ValueError(f"ModuleFormerConfig.aux_loss_weight must be a finite number >= 0, got "
                             f"{self.aux_loss_weight!r}.")
        if self.kernel_backend not in KERNEL_BACKENDS:
            raise ValueError(
                f"ModuleFormerConfig.kernel_backend must be one of {KERNEL_BACKENDS}, got {self.kernel_backend!r}."
            )


def _uniform_to_int(counts: Any) -> Any:
    """A per-layer list whose entries are all equal becomes that int (IBM's form); anything else is kept as is."""
    if isinstance(counts, (list, tuple)):
        counts = list(counts)
        if counts and all(type(c) is int for c in counts) and len(set(counts)) == 1:
            return counts[0]
    return counts


def _check_counts(name: str, counts: Any, n_layer: int) -> None:
    """Expert counts: a positive int, or a list of ``n_layer`` positive ints."""
    if isinstance(counts, list):
        if len(counts) != n_layer:
            raise ValueError(
                f"ModuleFormerConfig.{name} has {len(counts)} per-layer counts but n_layer is {n_layer}: give one "
                f"count per layer, or a single int for all layers."
            )
        bad = [c for c in counts if isinstance(c, bool) or not isinstance(c, int) or c <= 0]
        if bad:
            raise ValueError(f"ModuleFormerConfig.{name} per-layer counts must be positive integers, got {counts!r}.")
        return
    if isinstance(counts, bool) or not isinstance(counts, int) or counts <= 0:
        raise ValueError(
            f"ModuleFormerConfig.{name} must be a positive integer or a list of one per layer, got {counts!r}."
        )


def _count_at(counts: int | list[int], layer: int) -> int:
    return counts[layer] if isinstance(counts, list) else counts


def bundled_config_path(name: str) -> str:
    """Path of a model config shipped in ``configs/`` (e.g. ``"moduleformer-tiny"``; ``.json`` optional)."""
    from importlib.resources import files

    filename = name if name.endswith(".json") else f"{name}.json"
    path = files("moduleformer_exit.configs") / filename
    if not path.is_file():
        available = sorted(p.name for p in files("moduleformer_exit.configs").iterdir() if p.name.endswith(".json"))
        raise FileNotFoundError(f"No bundled config {filename!r}; available: {', '.join(available)}.")
    return str(path)
