"""MultiExitConfiguration: runtime options of multi-exit models (drop-in for autocontrastive-gen's class)."""
from __future__ import annotations

import enum
import math
from dataclasses import dataclass, fields
from typing import Any, Callable, Optional, Sequence, Union

from torch import Tensor

LayerIndex = Union[int, str]  # an exit layer (1-based block count) or "original" (the model's own lm_head)
ORIGINAL = "original"


class VocabularyProjectionMode(enum.Enum):
    """How exit hidden states become vocabulary logits (values as in autocontrastive-gen)."""

    LAYER_SPECIFIC_PROJECTION = 0  # a learned Linear(hidden, vocab) per exit: name_to_lm_exit_head.lm_head_<k>
    SHARED_PROJECTION_CAST_OUTPUTS = 1  # lm_head(cast_k(ln_f(h_k))), cast fitted by least squares ("tuned lens")
    SHARED_PROJECTION_DIRECT = 2  # lm_head(ln_f(h_k)) ("logit lens")


def _parse_index(value: Any) -> LayerIndex:
    if isinstance(value, str):
        text = value.strip()
        if text.lower() == ORIGINAL:
            return ORIGINAL
        try:
            return int(text)
        except ValueError:
            raise ValueError(f"Exit layer {value!r} is neither an integer nor 'original'.") from None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"Exit layer {value!r} must be an integer (1-based block count) or 'original'.")
    return value


def _parse_bool(name: str, value: Any) -> bool:
    """A bool, or its string form as lm-eval passes it (``True``/``false``/``1``/``0``, any case)."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "1", "yes"):
        return True
    if text in ("false", "0", "no"):
        return False
    raise ValueError(f"{name} must be true or false, got {value!r}.")


def _parse_whole(name: str, value: Any) -> int:
    """An integer, or a string / float holding a whole number (never truncated: 2.7 is an error)."""
    try:
        number = float(value) if not isinstance(value, bool) else None
    except (TypeError, ValueError):
        number = None
    if number is None or not math.isfinite(number) or number != int(number):
        raise ValueError(f"{name} must be a whole number, got {value!r}.")
    return int(number)


def _parse_indices(value: Any) -> Optional[tuple]:
    if value is None:
        return None
    parts = value.split(";") if isinstance(value, str) else list(value)
    return tuple(_parse_index(p) for p in parts)


@dataclass
class MultiExitConfiguration:
    """Runtime configuration of a multi-exit model; same field names, defaults and string forms as
    autocontrastive-gen's ``MultiExitConfiguration`` (migrating is a change of the import line).

    - ``lm_head_layer_indices``: layers (1-based) that get exit heads; saved in ``config.json``. Needed to create heads;
      read from the checkpoint otherwise (a runtime value overrides it, e.g. to train a subset).
    - ``freeze_parameters``: freeze every pre-existing parameter so only the new exit heads train.
    - ``use_original_head`` (default True): plain model output, exits ignored. ACD or early exit needs False.
    - ``output_layer_index``: output exit k's raw logits (early exit at layer k).
    - ``contrast_layer_indices``: ``(upper, lower)`` for ACD, ints or ``'original'``; also the string ``'original;12'``.
    - ``contrast_function``: ``f(upper_logits, lower_logits) -> output``; default ACD with ``alpha`` and
      ``minimum_candidates``.
    - ``vocab_projection_mode``: a :class:`VocabularyProjectionMode` (or its name, case-insensitive).
    - ``alpha`` (0.1), ``minimum_candidates`` (1): ACD plausibility threshold and minimum head-set size.
    """

    lm_head_layer_indices: Optional[Sequence[int]] = None
    freeze_parameters: bool = False
    use_original_head: bool = True
    output_layer_index: Optional[int] = None
    contrast_layer_indices: Optional[Sequence[LayerIndex]] = None
    contrast_function: Optional[Callable[[Tensor, Tensor], Tensor]] = None
    vocab_projection_mode: VocabularyProjectionMode = VocabularyProjectionMode.LAYER_SPECIFIC_PROJECTION
    alpha: float = 0.1
    minimum_candidates: int = 1

    def __post_init__(self) -> None:
        # lm-eval passes every model arg as a string: accept the reference library's string forms.
        if self.lm_head_layer_indices is not None:
            indices = _parse_indices(self.lm_head_layer_indices)
            if any(not isinstance(i, int) for i in indices):
                raise ValueError(
                    f"lm_head_layer_indices must be integers (1-based layers), got {self.lm_head_layer_indices!r}."
                )
            self.lm_head_layer_indices = indices
        self.use_original_head = _parse_bool("use_original_head", self.use_original_head)
        self.freeze_parameters = _parse_bool("freeze_parameters", self.freeze_parameters)
        if isinstance(self.output_layer_index, str):
            self.output_layer_index = int(self.output_layer_index)
        if isinstance(self.vocab_projection_mode, str):
            try:
                self.vocab_projection_mode = VocabularyProjectionMode[self.vocab_projection_mode.strip().upper()]
            except KeyError:
                names = ", ".join(m.name for m in VocabularyProjectionMode)
                raise ValueError(f"Unknown vocab_projection_mode {self.vocab_projection_mode!r}; use one of {names}.")
        elif isinstance(self.vocab_projection_mode, int):
            self.vocab_projection_mode = VocabularyProjectionMode(self.vocab_projection_mode)
        try:
            self.alpha = float(self.alpha)
        except (TypeError, ValueError):
            raise ValueError(f"alpha must be a number in [0, 1], got {self.alpha!r}.") from None
        self.minimum_candidates = _parse_whole("minimum_candidates", self.minimum_candidates)
        self.contrast_layer_indices = _parse_indices(self.contrast_layer_indices)
        self._validate()

    def _validate(self) -> None:
        if self.contrast_layer_indices is not None:
            if self.use_original_head:
                raise ValueError(
                    "Contradiction in model configuration: contrast_layer_indices is set but use_original_head=True "
                    "(the default). Pass use_original_head=False to decode with the contrast."
                )
            if len(self.contrast_layer_indices) != 2:
                raise ValueError(
                    f"contrast_layer_indices needs exactly two layers (upper, lower), got {self.contrast_layer_indices}."
                )
            if self.output_layer_index is not None:
                raise ValueError("Set either contrast_layer_indices or output_layer_index, not both.")
        if self.output_layer_index is not None and self.use_original_head:
            raise ValueError(
                "Contradiction in model configuration: output_layer_index is set but use_original_head=True "
                "(the default). Pass use_original_head=False to output an exit layer."
            )
        if not self.use_original_head and self.contrast_layer_indices is None and self.output_layer_index is None:
            raise ValueError(
                "use_original_head=False needs an exit to decode from: set output_layer_index=k or "
                "contrast_layer_indices=(upper, lower)."
            )
        for index in self.requested_layers():
            if index != ORIGINAL and index < 1:
                raise ValueError(f"Exit layer {index} is invalid: exit layers count blocks from 1 (0 = embeddings).")
        for index in self.lm_head_layer_indices or ():
            if index < 1:
                raise ValueError(f"Exit layer {index} in lm_head_layer_indices is invalid: layers count from 1.")
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {self.alpha}.")
        if self.minimum_candidates < 1:
            raise ValueError(f"minimum_candidates must be >= 1, got {self.minimum_candidates}.")

    def requested_layers(self) -> tuple:
        """The exits the output needs: the contrast pair, or the output layer, or none (original head)."""
        if self.use_original_head:
            return ()
        if self.contrast_layer_indices is not None:
            return tuple(self.contrast_layer_indices)
        return (self.output_layer_index,)

    def get_description(self) -> str:
        """``'original_head'``, ``'<upper>_vs_<lower>'`` or ``'layer_<k>'`` (as the reference library)."""
        if self.use_original_head:
            return "original_head"
        if self.contrast_layer_indices is not None:
            upper, lower = self.contrast_layer_indices
            return f"{upper}_vs_{lower}"
        return f"layer_{self.output_layer_index}"

    def get_runtime_kwargs(self) -> dict:
        """All fields except ``lm_head_layer_indices`` (which belongs to the checkpoint)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "lm_head_layer_indices"}
