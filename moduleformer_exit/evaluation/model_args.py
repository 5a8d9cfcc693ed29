"""Multi-exit model arguments as lm-eval delivers them (strings, or values lm-eval already typed) ->
:class:`~moduleformer_exit.MultiExitConfiguration`, with a clear error for anything malformed.

Accepted forms (``--model_args`` / ``simple_evaluate(model_args=...)``):

- ``use_original_head``: ``true/false``, ``True/False``, ``1/0`` (or a bool). Left out, it is ``False`` when an exit
  or a contrast pair is given and ``True`` otherwise.
- ``output_layer_index``: an integer exit layer (1-based), or ``none``.
- ``contrast_layer_indices``: ``'UPPER;LOWER'`` (e.g. ``'original;12'``, ``12;6``), or a 2-sequence.
- ``vocab_projection_mode``: a :class:`~moduleformer_exit.VocabularyProjectionMode` name (any case) or value 0/1/2.
- ``alpha`` (float in [0, 1]), ``minimum_candidates`` (int >= 1): the ACD parameters.
"""
from __future__ import annotations

from typing import Any, Optional

from ..multi_exit_config import MultiExitConfiguration, VocabularyProjectionMode

MULTI_EXIT_ARGS = ("use_original_head", "output_layer_index", "contrast_layer_indices", "vocab_projection_mode",
                   "alpha", "minimum_candidates")
_TRUE, _FALSE = ("true", "1"), ("false", "0")


def parse_bool(name: str, value: Any) -> bool:
    """``True/False``, ``"true"/"false"`` (any case), ``1/0`` (int or string) -> bool; anything else: ValueError."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
        return value.strip().lower() in _TRUE
    raise ValueError(f"Model argument {name}={value!r} is not a boolean: use true or false (True/False, 1/0 also work).")


def parse_optional_int(name: str, value: Any) -> Optional[int]:
    """An integer (or a string of one), ``None`` / ``"none"`` -> int or None; anything else: ValueError."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none")):
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            pass
    raise ValueError(f"Model argument {name}={value!r} is not an integer layer index (e.g. {name}=12).")


def parse_contrast(value: Any) -> Optional[tuple]:
    """``'UPPER;LOWER'`` or a 2-sequence of layers (ints or ``'original'``) -> a 2-tuple (validated later)."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none")):
        return None
    if isinstance(value, str):
        parts = [p.strip() for p in value.split(";")]
    elif isinstance(value, (list, tuple)):
        parts = list(value)
    else:
        parts = None
    if parts is None or len(parts) != 2:
        raise ValueError(
            f"Model argument contrast_layer_indices={value!r} must be two layers 'UPPER;LOWER' separated by a "
            "semicolon, e.g. contrast_layer_indices='original;12' (commas separate model arguments)."
        )
    out = []
    for part in parts:
        if isinstance(part, str) and part.lower() == "original":
            out.append("original")
            continue
        try:
            out.append(parse_optional_int("contrast_layer_indices", part))
        except ValueError:
            raise ValueError(f"Model argument contrast_layer_indices={value!r}: {part!r} is neither an integer exit "
                             "layer nor 'original'.") from None
    return tuple(out)


def parse_float(name: str, value: Any) -> float:
    """A number (or a string of one) -> float; anything else: ValueError."""
    if isinstance(value, bool):
        raise ValueError(f"Model argument {name}={value!r} must be a number.")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"Model argument {name}={value!r} must be a number (e.g. {name}=0.1).") from None


def multi_exit_config_from_args(use_original_head: Any = None, output_layer_index: Any = None,
                                contrast_layer_indices: Any = None, vocab_projection_mode: Any = None,
                                alpha: Any = None, minimum_candidates: Any = None) -> MultiExitConfiguration:
    """Build the runtime :class:`MultiExitConfiguration` from model arguments (see the module docstring).

    ``alpha`` / ``minimum_candidates`` left as None take MultiExitConfiguration's defaults (0.1, 1).
    Raises ValueError naming the argument for a malformed value or a contradictory combination."""
    output_layer_index = parse_optional_int("output_layer_index", output_layer_index)
    contrast = parse_contrast(contrast_layer_indices)
    if use_original_head is None:
        use_original_head = output_layer_index is None and contrast is None
    else:
        use_original_head = parse_bool("use_original_head", use_original_head)
    if vocab_projection_mode is None:
        vocab_projection_mode = VocabularyProjectionMode.LAYER_SPECIFIC_PROJECTION
    elif isinstance(vocab_projection_mode, str) and vocab_projection_mode.strip().isdigit():
        vocab_projection_mode = int(vocab_projection_mode)
    alpha = 0.1 if alpha is None else parse_float("alpha", alpha)
    minimum = 1 if minimum_candidates is None else parse_float("minimum_candidates", minimum_candidates)
    if minimum != int(minimum):
        raise ValueError(f"Model argument minimum_candidates={minimum_candidates!r} must be an integer >= 1.")
    try:
        return MultiExitConfiguration(use_original_head=use_original_head, output_layer_index=output_layer_index,
                                      contrast_layer_indices=contrast, vocab_projection_mode=vocab_projection_mode,
                                      alpha=alpha, minimum_candidates=int(minimum))
    except ValueError as error:
        raise ValueError(f"Invalid multi-exit model arguments: {error}") from None
