"""Strict checkpoint loading: a weight the model needs but the checkpoint lacks is an error, not a random init.

transformers initialises missing weights randomly and only mentions it in its load report, so a checkpoint without
an exit head, a layer or an expert would decode garbage. :func:`from_pretrained_strict` wraps a ``from_pretrained``
call, reads transformers' public ``output_loading_info=True`` report and raises :class:`MissingWeightsError`
listing the missing keys that the caller did not declare new (e.g. exit heads ``train-exits`` is about to train).
"""
from __future__ import annotations

from typing import Any, Callable

__all__ = ["MissingWeightsError", "from_pretrained_strict"]


class MissingWeightsError(ValueError):
    """The checkpoint lacks weights the model needs (listed in the message)."""


def from_pretrained_strict(load: Callable[..., Any], args: tuple, kwargs: dict, required: Callable[[str], bool],
                           fix: str) -> Any:
    """``load(*args, **kwargs)`` (a ``from_pretrained``), raising if a missing key satisfies ``required(key)``.

    Returns what the caller asked for: the model, or ``(model, loading_info)`` with ``output_loading_info=True``.
    ``fix`` completes the error message (how to load on purpose with new weights)."""
    want_info = kwargs.pop("output_loading_info", False)
    path = args[0] if args else kwargs.get("pretrained_model_name_or_path")
    try:
        model, info = load(*args, output_loading_info=True, **kwargs)
    except EOFError:  # torch.load of a zero-byte / truncated pytorch_model.bin says nothing else
        raise ValueError(f"A weights file in {path} is empty or truncated (EOFError while reading it): save or copy "
                         f"the checkpoint again.") from None
    missing = sorted(k for k in (info or {}).get("missing_keys", ()) if required(k))
    if missing:
        shown = ", ".join(missing[:12]) + (f", ... ({len(missing)} in all)" if len(missing) > 12 else "")
        raise MissingWeightsError(f"Checkpoint {path} lacks weights of {type(model).__name__}: {shown}. They would "
                                  f"be random. Use a complete checkpoint; {fix}")
    return (model, info) if want_info else model
