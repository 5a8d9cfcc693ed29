"""Training losses for early exit, beside the multi-exit model's summed / CALM-weighted exit CE:

- FREE's shallow-deep loss: ``(S * CE_S + L * CE_L) / (S + L) + alpha * KD``, KD = hidden-state MSE between the
  detached deep (teacher) states and the shallow (student) states, matched by FREE's dynamic monotone rule
  (``kd_dyna``), on final-normed states;
- LayerSkip's early-exit loss: per-exit CEs with scale ``one|l|sum_l|inv_l|sqrt_l|inv_sqrt_l`` (``e_scale`` for the
  non-final layers, renormalised to sum 1), and per-sample layer dropout ``p_l = p_max * S(l)``.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor, nn

# FREE's teacher-layer table (0-based block-output indices) where the closed form differs (24 -> 10).
TEACHER_LAYER_OVERRIDES = {(24, 10): [2, 5, 7, 10, 12, 15, 17, 19, 21, 23]}
EXIT_SCALES = ("one", "l", "sum_l", "inv_l", "sqrt_l", "inv_sqrt_l")
LAYER_DROPOUT_SCALES = ("exp", "uniform", "linear")


def teacher_layers(num_layers: int, shallow: int) -> list[int]:
    """FREE's teacher block indices (0-based) for the S student blocks: ``ceil((k + 1) * L / S) - 1``."""
    if not 0 < shallow < num_layers:
        raise ValueError(f"shallow exit must be in 1..{num_layers - 1}, got {shallow}.")
    if (num_layers, shallow) in TEACHER_LAYER_OVERRIDES:
        return list(TEACHER_LAYER_OVERRIDES[(num_layers, shallow)])
    return [math.ceil((k + 1) * num_layers / shallow) - 1 for k in range(shallow)]


def kd_dyna_assignment(costs: Tensor) -> list[int]:
    """FREE's dynamic matching: for teachers from the last down, the student ``argmin_{s < upper} costs[t, s]``,
    then ``upper = that s`` (strictly decreasing while candidates remain, then pinned at the last ``upper``).

    ``costs`` ``[T, S]``; returns the student index per teacher (T entries)."""
    teachers, students = costs.shape
    upper = students
    picked = [0] * teachers
    for t in range(teachers - 1, -1, -1):
        if upper > 0:
            upper = int(costs[t, :upper].argmin())
        picked[t] = upper
    return picked


def shallow_deep_loss(model: nn.Module, hidden_states: tuple[Tensor, ...], labels: Tensor, shallow: int,
                      alpha: float = 0.5, ce_shallow: Optional[Tensor] = None, ce_deep: Optional[Tensor] = None
                      ) -> dict[str, Tensor]:
    """FREE's loss for a multi-exit model. ``hidden_states``: the backbone's L + 1 states (``[B, T, D]`` each, the
    last already final-normed); ``labels`` ``[B, T]`` (-100 ignored; the model's token loss: shifted for causal LMs,
    unshifted for T5's decoder); ``shallow`` = S. ``ce_shallow`` / ``ce_deep``: the exit-S / original-head CEs when
    already computed (the model's forward).

    Returns ``{"loss", "ce_shallow", "ce_deep", "kd"}``; the teacher states get no gradient."""
    num_layers = model.num_exit_layers  # T5: the decoder's layers
    if ce_shallow is None:
        ce_shallow = model.token_loss(model.exit_logits(hidden_states, shallow), labels)  # T5: unshifted
    if ce_deep is None:
        ce_deep = model.token_loss(model.exit_logits(hidden_states, "original"), labels)
    ce = (shallow * ce_shallow + num_layers * ce_deep) / (shallow + num_layers)
    norm = model.final_norm()
    state = lambda i: hidden_states[i + 1] if i + 1 == num_layers else norm(hidden_states[i + 1])  # noqa: E731
    teachers = [state(i).detach() for i in teacher_layers(num_layers, shallow)]
    students = [state(s) for s in range(shallow)]
    costs = torch.stack([torch.stack([torch.mean((t - s) ** 2) for s in students]) for t in teachers])
    picked = kd_dyna_assignment(costs.detach())
    kd = torch.stack([costs[t, s] for t, s in enumerate(picked)]).mean()
    return {"loss": ce + alpha * kd, "ce_shallow": ce_shallow, "ce_deep": ce_deep, "kd": kd}


def early_exit_loss_weights(layers: list[int], num_layers: int, scale: str = "sum_l", e_scale: float = 1.0
                            ) -> dict[int, float]:
    """LayerSkip's per-exit weights (``layers`` 1-based, L = final): ``one`` 1, ``l`` l, ``sum_l`` 1+..+l,
    ``inv_l`` 1/l, ``sqrt_l`` sqrt(l), ``inv_sqrt_l`` 1/sqrt(l); non-final layers times ``e_scale``; sum 1."""
    if scale not in EXIT_SCALES:
        raise ValueError(f"scale must be one of {EXIT_SCALES}, got {scale!r}.")
    raw = {"one": lambda l: 1.0, "l": float, "sum_l": lambda l: l * (l + 1) / 2.0, "inv_l": lambda l: 1.0 / l,
           "sqrt_l": math.sqrt, "inv_sqrt_l": lambda l: 1.0 / math.sqrt(l)}[scale]
    weights = {l: raw(l) * (1.0 if l == num_layers else e_scale) for l in layers}
    total = sum(weights.values())
    return {l: w / total for l, w in weights.items()}


def layerskip_loss(exit_losses: dict[int, Tensor], lm_loss: Tensor, num_layers: int, scale: str = "sum_l",
                   e_scale: float = 1.0) -> Tensor:
    """Weighted sum of the exits' CEs and the final CE (``lm_loss`` at layer L) with
    :func:`early_exit_loss_weights`."""
    losses = dict(exit_losses)
    losses[num_layers] = lm_loss
    weights = early_exit_loss_weights(sorted(losses), num_layers, scale, e_scale)
    return sum(weights[l] * losses[l] for l in losses)


def layer_dropout_rates(num_layers: int, p_max: float, scale: str = "exp") -> list[float]:
    """Per-block skip probabilities ``p_max * S(l)``; ``exp``: ``S(l) = exp(l ln2 / (L - 1)) - 1`` (0 first, 1 last),
    ``uniform``: 1, ``linear``: l / (L - 1)."""
    if not 0.0 <= p_max <= 1.0:
        raise ValueError(f"p_max must be in [0, 1], got {p_max!r}.")
    last = max(num_layers - 1, 1)
    shape = {"exp": lambda l: math.exp(l * math.log(2) / last) - 1, "uniform": lambda l: 1.0,
             "linear": lambda l: l / last}
    if scale not in LAYER_DROPOUT_SCALES:
        raise ValueError(f"layer dropout scale must be one of {LAYER_DROPOUT_SCALES}, got {scale!r}.")
    return [p_max * shape[scale](l) for l in range(num_layers)]


def enable_layer_dropout(blocks: nn.ModuleList, rates: list[float], seed: int = 0) -> list:
    """Per-sample layer dropout in training: each block's output is replaced by its input for the rows drawn
    (Bernoulli(rate), a seeded generator per block); no effect in eval. Returns the hook handles (``.remove()``)."""
    handles = []
    for block, rate in zip(blocks, rates):
        generator = torch.Generator().manual_seed(seed + len(handles))

        def hook(module: nn.Module, args: tuple, kwargs: dict, output, rate: float = rate, generator=generator):
            if not module.training or rate <= 0:
                return output
            hidden_in = args[0] if args else kwargs["hidden_states"]
            drop = torch.rand(hidden_in.shape[0], generator=generator) < rate
            hidden_out = output[0] if isinstance(output, tuple) else output  # GPT-2 blocks return a tensor
            hidden = torch.where(drop.to(hidden_in.device)[:, None, None], hidden_in, hidden_out)
            return (hidden,) + tuple(output[1:]) if isinstance(output, tuple) else hidden

        handles.append(block.register_forward_hook(hook, with_kwargs=True))
    return handles
