"""Whether a module may be bypassed: its weights read directly instead of its ``forward`` being called.

Fast paths (the decode step, ACD's head-set projection) read a module's parameters themselves. That is only the
same computation when the module is exactly the class the fast path assumes and nothing is attached to its call:

- a subclass or wrapper (PEFT's LoRA ``Linear``, a quantised linear) computes something else;
- forward (pre-)hooks, module-level or global (user hooks, transformers' output capture, DeepSpeed ZeRO-3's
  parameter gathering), must see the call;
- accelerate's offloading replaces the instance's ``forward`` (``module.forward`` in the instance ``__dict__``);
- a ZeRO-3 partitioned parameter (``ds_id``) holds no data outside its module's forward.
"""
from __future__ import annotations

from torch import nn
from torch.nn.modules import module as _torch_module

__all__ = ["is_plain", "is_stock", "unhooked", "no_global_hooks"]


def no_global_hooks() -> bool:
    """No global forward hooks are registered (``nn.modules.module.register_module_forward_(pre_)hook``)."""
    # torch keeps them in module-level dicts and offers no public query for them
    return not (_torch_module._global_forward_hooks or _torch_module._global_forward_pre_hooks)


def unhooked(module: nn.Module) -> bool:
    """No forward (pre-)hooks on ``module`` and no instance-level ``forward`` override (cheap: dict reads only)."""
    return not (module._forward_hooks or module._forward_pre_hooks or "forward" in module.__dict__)


def is_stock(module: nn.Module, cls: type) -> bool:
    """``module`` is exactly a ``cls`` (not a subclass) and holds no ZeRO-3 partitioned parameters (what does not
    change while a model is used; hooks do, see :func:`unhooked`)."""
    if type(module) is not cls:
        return False
    return not any(hasattr(p, "ds_id") for p in module._parameters.values() if p is not None)


def is_plain(module: nn.Module, cls: type) -> bool:
    """:func:`is_stock` and :func:`unhooked` (global hooks: :func:`no_global_hooks`)."""
    return is_stock(module, cls) and unhooked(module)
