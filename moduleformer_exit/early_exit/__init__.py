"""Early-exit decoding for ModuleFormer, GPT-2 and GPT-Neo (one adapter per backbone family, :mod:`.backbones`):
static exit, CALM (state propagation), FREE (shallow-deep, synchronized parallel decoding, Beta-mixture threshold)
and lossless self-speculative decoding, behind :func:`generate_early_exit`; FREE / LayerSkip training losses in
:mod:`.losses`."""
from .api import EarlyExitOutput, generate_early_exit
from .backbones import BackboneAdapter, register_adapter
from .beta_mixture import BetaMixtureThreshold
from .config import EarlyExitConfig
from .stack import LayerStack

__all__ = ["BackboneAdapter", "register_adapter", "EarlyExitConfig", "EarlyExitOutput", "generate_early_exit",
           "BetaMixtureThreshold", "LayerStack"]
