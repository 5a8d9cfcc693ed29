"""Early-exit decoding for ModuleFormer: static exit, CALM (state propagation), FREE (shallow-deep, synchronized
parallel decoding, Beta-mixture threshold) and lossless self-speculative decoding, behind
:func:`generate_early_exit`; FREE / LayerSkip training losses in :mod:`.losses`."""
from .api import EarlyExitOutput, generate_early_exit
from .beta_mixture import BetaMixtureThreshold
from .config import EarlyExitConfig
from .stack import LayerStack

__all__ = ["EarlyExitConfig", "EarlyExitOutput", "generate_early_exit", "BetaMixtureThreshold", "LayerStack"]
