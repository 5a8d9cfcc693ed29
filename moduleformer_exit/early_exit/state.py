"""Decoding bookkeeping shared by the early-exit loops: emitted tokens with EOS / padding as ``generate()`` does it,
the growing attention mask, and the counters every method reports."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
from torch import Tensor


class TokenSink:
    """Collects new tokens ``[B]`` per step. As transformers' ``generate``: once a row emitted an EOS id, its later
    tokens are ``pad_token_id``; decoding is done when every row finished or ``max_new_tokens`` were emitted."""

    def __init__(self, batch: int, max_new_tokens: int, eos_token_id: Optional[Sequence[int]],
                 pad_token_id: Optional[int], device: torch.device) -> None:
        self.max_new_tokens = max_new_tokens
        self.eos = (torch.tensor(list(eos_token_id), device=device) if eos_token_id is not None and len(eos_token_id)
                    else None)
        if self.eos is not None and pad_token_id is None:
            raise ValueError("eos_token_id is set but pad_token_id is None: finished rows need a pad id "
                             "(pass pad_token_id, e.g. the EOS id).")
        self.pad = pad_token_id
        self.finished = torch.zeros(batch, dtype=torch.bool, device=device)
        self.tokens: list[Tensor] = []
        self.layers: list[Tensor] = []

    @property
    def count(self) -> int:
        return len(self.tokens)

    @property
    def remaining(self) -> int:
        return self.max_new_tokens - len(self.tokens)

    @property
    def done(self) -> bool:
        return self.remaining <= 0 or bool(self.finished.all())

    def push(self, token: Tensor, layer: int | Tensor) -> Tensor:
        """Append ``token`` ``[B]`` (exit layer ``layer``, int or ``[B]``); returns the token as fed back to the
        model (``pad`` on finished rows)."""
        if self.eos is not None:
            token = torch.where(self.finished, torch.full_like(token, self.pad), token)
        layer = torch.as_tensor(layer, device=token.device).expand(token.shape).clone()
        layer[self.finished] = 0
        self.tokens.append(token)
        self.layers.append(layer)
        if self.eos is not None:
            self.finished |= torch.isin(token, self.eos)
        return token

    def result(self) -> tuple[Tensor, Tensor]:
        """``(tokens [B, N], exit_layers [B, N])``; exit layer 0 marks padding after EOS."""
        return torch.stack(self.tokens, 1), torch.stack(self.layers, 1)


class MaskBook:
    """The 0/1 attention mask over prompt + new positions (new positions are always visible); None when the
    prompt has no padding (the unmasked kernels are exact and faster)."""

    def __init__(self, attention_mask: Optional[Tensor]) -> None:
        self.mask = None if attention_mask is None or bool(attention_mask.all()) else attention_mask

    def upto(self, length: int) -> Optional[Tensor]:
        """Mask ``[B, length]`` for a block range whose cache + new positions number ``length``."""
        if self.mask is None:
            return None
        extra = length - self.mask.shape[1]
        if extra > 0:
            self.mask = torch.cat([self.mask, self.mask.new_ones(self.mask.shape[0], extra)], 1)
        return self.mask[:, :length]


@dataclass
class DecodeStats:
    """Counters of one early-exit generation (per batch, rows counted once: decisions are batch-synchronous).

    ``block_tokens``: sum over block calls of the tokens processed (token-layer units, catch-up and verify
    included); ``kv_projections``: token-layer K/V projections of state propagation (CALM);
    ``head_calls``: exit-head evaluations (token positions projected to the vocabulary); ``drafted`` /
    ``accepted``: draft tokens proposed / accepted (self-speculation); ``deep_calls`` and ``catch_up_tokens``
    (FREE); ``verify_experts``: distinct experts per block of each verify / deep call (when recorded)."""

    steps: int = 0
    block_tokens: int = 0
    kv_projections: int = 0
    head_calls: int = 0
    drafted: int = 0
    accepted: int = 0
    deep_calls: int = 0
    catch_up_tokens: int = 0
    verify_experts: list = field(default_factory=list)
    thresholds: list = field(default_factory=list)

    def as_dict(self, new_tokens: int) -> dict:
        """Summary numbers: mean token-layer units per emitted token, acceptance rate, mean distinct experts."""
        return {
            "new_tokens": new_tokens,
            "layers_per_token": self.block_tokens / max(new_tokens, 1),
            "kv_projections_per_token": self.kv_projections / max(new_tokens, 1),
            "head_calls_per_token": self.head_calls / max(new_tokens, 1),
            "acceptance_rate": (self.accepted / self.drafted) if self.drafted else None,
            "deep_calls": self.deep_calls,
            "catch_up_tokens": self.catch_up_tokens,
            "distinct_experts_per_verify": (sum(self.verify_experts) / len(self.verify_experts)
                                            if self.verify_experts else None),
        }
