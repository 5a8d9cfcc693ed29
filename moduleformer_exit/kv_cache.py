"""A KV-cache layer that appends in place: preallocated, geometrically grown buffers instead of ``torch.cat``.

transformers' ``DynamicLayer`` concatenates the whole cache on every decode step (O(S) copies per token and
layer). :class:`GrowingLayer` is a ``DynamicLayer`` whose ``keys`` / ``values`` are views ``[B, H, S, D]`` of
buffers with spare capacity along S: a step writes one slice; when the buffer is full its capacity doubles
(amortised O(1) per token). Everything else (``get_seq_length``, ``crop``, beam reordering, offloading, ``reset``)
is inherited: ``crop`` leaves views of the same buffers (later appends overwrite the dropped positions); the
others replace ``keys`` / ``values`` with other tensors (or drop them), and the next ``update`` notices (they no
longer view its buffers) and adopts them into fresh buffers.

:func:`use_growing_layers` swaps the still-empty plain ``DynamicLayer`` layers of a cache (the one ``generate()``
or the model creates) for growing ones, through the public ``Cache.layers`` list; other layer types are left alone.
Same values as ``DynamicLayer`` (a copy, no arithmetic); the returned K/V are strided views, which the attention
kernels read as they are.
"""
from __future__ import annotations

from typing import Optional

from torch import Tensor
from transformers.cache_utils import Cache, DynamicLayer

__all__ = ["GrowingLayer", "use_growing_layers"]

_MIN_CAPACITY = 64  # positions allocated at least (prompt + a first stretch of decode)


class GrowingLayer(DynamicLayer):
    """``DynamicLayer`` with in-place appends into buffers ``[B, H, capacity, D]`` (capacity doubles when full)."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self._key_buffer: Optional[Tensor] = None
        self._value_buffer: Optional[Tensor] = None

    def _adopt(self, key_states: Tensor, value_states: Tensor, needed: int) -> None:
        """Move the current ``keys`` / ``values`` (possibly empty or replaced) into fresh buffers with room for
        ``needed`` positions (twice that, at least ``_MIN_CAPACITY``); new states give batch, heads and dtype."""
        length = self.keys.shape[-2] if self.keys.dim() == 4 else 0
        capacity = max(_MIN_CAPACITY, 2 * needed)
        buffers = []
        for old, new in ((self.keys, key_states), (self.values, value_states)):
            buffer = new.new_empty(new.shape[0], new.shape[1], capacity, new.shape[3])
            if length:
                buffer[:, :, :length].copy_(old)
            buffers.append(buffer)
        self._key_buffer, self._value_buffer = buffers

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
        """Append ``key_states`` / ``value_states`` ``[B, H, T, D]``; returns the cached ``[B, H, S, D]`` views."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        keys, values = self.keys, self.values
        start = keys.shape[-2] if keys.dim() == 4 else 0
        end = start + key_states.shape[-2]
        if (self._key_buffer is None or end > self._key_buffer.shape[2]
                or keys.data_ptr() != self._key_buffer.data_ptr()
                or values.data_ptr() != self._value_buffer.data_ptr() or keys.shape[:2] != key_states.shape[:2]):
            # first write, full, or keys/values replaced by an inherited method (reorder, batch select, ...)
            self._adopt(key_states, value_states, end)
        k_buf, v_buf = self._key_buffer, self._value_buffer
        k_buf[:, :, start:end].copy_(key_states)
        v_buf[:, :, start:end].copy_(value_states)
        self.keys, self.values = k_buf[:, :, :end], v_buf[:, :, :end]
        return self.keys, self.values


def use_growing_layers(cache: Optional[Cache]) -> Optional[Cache]:
    """Replace every empty plain ``DynamicLayer`` of ``cache`` by a :class:`GrowingLayer`, in place; returns ``cache``.

    Layers already holding states, and other layer types (sliding window, quantized, static), are kept.
    """
    layers = getattr(cache, "layers", None)
    if layers is None:
        return cache
    for i, layer in enumerate(layers):
        if type(layer) is DynamicLayer and not layer.is_initialized:
            layers[i] = GrowingLayer()
    return cache
