"""``EarlyExitConfig``: which early-exit decoding method to run and its parameters, validated on construction."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

METHODS = ("full", "static", "calm", "free", "self_speculative")
CONFIDENCES = ("softmax", "saturation")


@dataclass
class EarlyExitConfig:
    """Parameters of :func:`~moduleformer_exit.early_exit.generate_early_exit`.

    Layers are counted as in ``hidden_states``: exit ``k`` reads the state after ``k`` blocks (1 <= k <= L).

    - ``method="full"``: the own decode loop at full depth (the baseline all methods are timed against).
    - ``"static"``: every token uses ``exit_layer`` blocks and that exit's head.
    - ``"calm"``: per token, the first candidate exit in ``exit_layers`` (default: the model's exits, >= ``min_layer``)
      whose confidence is ``> threshold`` (``threshold`` decayed by CALM's schedule when ``decay_temperature`` is
      set) emits its argmax; the skipped layers' K/V come from the exit state (state propagation).
    - ``"free"``: one shallow exit ``exit_layer``; shallow-confident tokens are queued and caught up in the deep layers
      together with the next deep token (synchronized parallel decoding); ``adaptive_threshold`` refits ``threshold``
      online with the Beta-mixture estimator.
    - ``"self_speculative"``: draft ``gamma`` tokens with exit ``exit_layer``, verify them with the remaining layers
      in one forward, keep the longest agreeing prefix (greedy output equals plain greedy; with ``do_sample`` the
      output distribution equals plain sampling).

    Confidence (CALM / FREE): ``"softmax"`` = top-1 minus top-2 probability of the exit (in [0, 1]);
    ``"saturation"`` (CALM only) = cosine between the states after k and k - 1 blocks. An exit fires iff
    ``confidence > threshold`` (strict, as the FREE reference code): ``threshold=1`` never exits on softmax
    confidence, ``threshold=0`` always does.

    ``shared_head``: use ``ln_f`` + ``lm_head`` (the logit lens) at layers without a trained exit head instead of
    raising an error.
    """

    method: str = "static"
    exit_layer: Optional[int] = None
    threshold: float = 0.9
    min_layer: int = 1
    exit_layers: Optional[Sequence[int]] = None
    confidence: str = "softmax"
    decay_temperature: Optional[float] = None
    adaptive_threshold: bool = False
    gamma: int = 4
    do_sample: bool = False
    temperature: float = 1.0
    shared_head: bool = False

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"EarlyExitConfig.method must be one of {METHODS}, got {self.method!r}.")
        if self.confidence not in CONFIDENCES:
            raise ValueError(f"EarlyExitConfig.confidence must be one of {CONFIDENCES}, got {self.confidence!r}.")
        if self.confidence == "saturation" and self.method != "calm":
            raise ValueError("confidence='saturation' needs two consecutive exits, so it is only for method='calm'; "
                             "use confidence='softmax' for FREE.")
        if isinstance(self.threshold, bool) or not 0.0 <= float(self.threshold) <= 1.0:
            raise ValueError(f"EarlyExitConfig.threshold must be in [0, 1] (a confidence level), got "
                             f"{self.threshold!r}; 1 never exits, 0 always exits.")
        if self.method in ("static", "free", "self_speculative") and self.exit_layer is None:
            raise ValueError(f"method={self.method!r} needs exit_layer (the layer to exit / draft at).")
        if self.exit_layer is not None and (isinstance(self.exit_layer, bool) or int(self.exit_layer) < 1):
            raise ValueError(f"EarlyExitConfig.exit_layer must be a layer number >= 1, got {self.exit_layer!r}.")
        if isinstance(self.gamma, bool) or int(self.gamma) != self.gamma or self.gamma < 1:
            raise ValueError(f"EarlyExitConfig.gamma (draft tokens per verify) must be an integer >= 1, got "
                             f"{self.gamma!r}.")
        if self.min_layer < 1:
            raise ValueError(f"EarlyExitConfig.min_layer must be >= 1, got {self.min_layer!r}.")
        if self.decay_temperature is not None and self.decay_temperature < 0:
            raise ValueError(f"decay_temperature must be >= 0, got {self.decay_temperature!r}.")
        if self.adaptive_threshold and self.method != "free":
            raise ValueError("adaptive_threshold is FREE's Beta-mixture threshold: use it with method='free'.")
        if self.do_sample and self.method != "self_speculative":
            raise ValueError("do_sample is implemented for method='self_speculative' (distribution-preserving); the "
                             "other early-exit methods decode greedily.")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature!r}.")

    def check_model(self, num_layers: int, head_layers: Sequence[int]) -> None:
        """Raise ``ValueError`` if a layer named here does not exist in a model of ``num_layers`` layers or has no
        exit head (``head_layers``: layers with a head; all of them when ``shared_head``)."""
        wanted = [] if self.exit_layer is None else [int(self.exit_layer)]
        wanted += list(self.exit_layers or [])
        for layer in wanted:
            if not 1 <= layer <= num_layers:
                raise ValueError(f"exit layer {layer} is out of range: this model has {num_layers} layers.")
            if layer < num_layers and layer not in head_layers:
                raise ValueError(
                    f"exit layer {layer} has no exit head (the model's exit heads are at {sorted(head_layers)}); "
                    f"choose one of them, or pass shared_head=True to project with ln_f + lm_head.")
        if self.method in ("free", "self_speculative") and int(self.exit_layer) >= num_layers:
            raise ValueError(f"method={self.method!r} needs exit_layer < {num_layers} (a shallow exit below the top "
                             f"layer), got {self.exit_layer}.")
