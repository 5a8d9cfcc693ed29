"""moduleformer-exit: ModuleFormer (IBM MoLM) mixture-of-experts language models on transformers 5.

Importing the package registers ``model_type="moduleformer"`` with ``AutoConfig``, ``AutoModel``,
``AutoModelForCausalLM`` and ``AutoModelForSequenceClassification``, so
``AutoModelForCausalLM.from_pretrained(path)`` loads ModuleFormer / MoLM checkpoints (IBM's included).
"""
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
)

from .configuration import ModuleFormerConfig
from .contrast import auto_contrastive_log_probs, calculate_contrasted_logits
from .moe import MoE, ParallelExperts
from .modeling import (
    ModuleFormerForCausalLM,
    ModuleFormerForSequenceClassification,
    ModuleFormerModel,
    ModuleFormerPreTrainedModel,
)
from .multi_exit_config import MultiExitConfiguration, VocabularyProjectionMode
from .multi_exit_models import (
    AutoMultiExitModel,
    MultiExitGPT2,
    MultiExitGPTNeo,
    MultiExitLlama,
    MultiExitModuleFormer,
    MultiExitT5,
    fit_cast_matrices,
)

__version__ = "0.1.0"


def register() -> None:
    """Register the ModuleFormer classes with transformers' Auto classes (idempotent; done at import)."""
    AutoConfig.register(ModuleFormerConfig.model_type, ModuleFormerConfig, exist_ok=True)
    AutoModel.register(ModuleFormerConfig, ModuleFormerModel, exist_ok=True)
    AutoModelForCausalLM.register(ModuleFormerConfig, ModuleFormerForCausalLM, exist_ok=True)
    AutoModelForSequenceClassification.register(
        ModuleFormerConfig, ModuleFormerForSequenceClassification, exist_ok=True
    )


register()

__all__ = [
    "ModuleFormerConfig",
    "ModuleFormerModel",
    "ModuleFormerForCausalLM",
    "ModuleFormerForSequenceClassification",
    "ModuleFormerPreTrainedModel",
    "MoE",
    "ParallelExperts",
    "register",
    "MultiExitConfiguration",
    "VocabularyProjectionMode",
    "AutoMultiExitModel",
    "MultiExitModuleFormer",
    "MultiExitGPT2",
    "MultiExitGPTNeo",
    "MultiExitLlama",
    "MultiExitT5",
    "fit_cast_matrices",
    "auto_contrastive_log_probs",
    "calculate_contrasted_logits",
]
