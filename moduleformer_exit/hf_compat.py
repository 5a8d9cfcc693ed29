"""What differs between the transformers 5 releases this package supports, decided once at import.

transformers 5.24 renamed the generation cache argument and output field ``past_key_values`` -> ``cache``; releases
before it use ``past_key_values``. :data:`CACHE_NAME` is the name the installed release uses: forwards accept both
names (the old one keeps working for callers), pass the cache on under :data:`CACHE_NAME`, and return it under that
name, so ``generate()`` finds it where it looks.

Forwards also refuse keyword arguments they do not know (:func:`reject_unknown_kwargs`): an argument that a model
silently ignores, as happened with ``cache=`` on 5.24, makes generation silently wrong.
"""
from __future__ import annotations

import inspect
from typing import Any, Optional

from transformers import GenerationMixin

__all__ = ["CACHE_NAME", "NO_OP_KWARGS", "pick_cache", "cache_kwargs", "reject_unknown_kwargs"]

# `prepare_inputs_for_generation` names its cache parameter after what `generate()` passes to `forward`.
CACHE_NAME = (
    "cache" if "cache" in inspect.signature(GenerationMixin.prepare_inputs_for_generation).parameters
    else "past_key_values"
)

# Keyword arguments that transformers' callers (generate, Trainer, pipelines, PEFT) pass to every causal LM and that
# cannot change a ModuleFormer result: accepted and dropped. Anything else unknown raises a TypeError.
NO_OP_KWARGS = frozenset({
    "cache_position",       # removed in transformers 5 (offsets come from the cache); remote code may still pass it
    "return_dict",          # consumed by the output decorators; dropped if it reaches an inner forward
    "num_items_in_batch",   # Trainer's loss normaliser: consumed by the loss; a no-op for the base model
    "is_first_iteration",   # generation bookkeeping, only meaningful to prepare_inputs_for_generation
})


def pick_cache(cache: Any, past_key_values: Any) -> Any:
    """The cache a forward got, under either name (``cache=`` or the older ``past_key_values=``).

    :raises ValueError: both names given (with different objects).
    """
    if cache is not None and past_key_values is not None and cache is not past_key_values:
        raise ValueError("Pass the cache once, as cache= (transformers >= 5.24) or past_key_values=, not both.")
    return cache if cache is not None else past_key_values


def cache_kwargs(cache: Any) -> dict[str, Any]:
    """``{CACHE_NAME: cache}``: pass a cache to a transformers forward or output class under the installed name."""
    return {CACHE_NAME: cache}


def reject_unknown_kwargs(kwargs: dict[str, Any], where: str, also_allowed: frozenset[str] = frozenset()) -> None:
    """Raise ``TypeError`` naming every keyword in ``kwargs`` that is neither a no-op (:data:`NO_OP_KWARGS`) nor in
    ``also_allowed``; drops the no-ops from ``kwargs`` in place.

    :param kwargs: the ``**kwargs`` a forward received.
    :param where: the forward's qualified name, for the message.
    """
    unknown = sorted(k for k in kwargs if k not in NO_OP_KWARGS and k not in also_allowed)
    if unknown:
        raise TypeError(
            f"{where}() got unexpected keyword argument(s) {', '.join(map(repr, unknown))}: ModuleFormer would ignore "
            f"them and compute something else than asked. Remove them, or check the name against the forward's "
            f"signature (the cache is passed as {CACHE_NAME}=)."
        )
    for name in [k for k in kwargs if k in NO_OP_KWARGS]:
        kwargs.pop(name)


def output_cache(output: Any) -> Optional[Any]:
    """The cache of a transformers model output, read under the installed name (no deprecation warning)."""
    return getattr(output, CACHE_NAME, None)
