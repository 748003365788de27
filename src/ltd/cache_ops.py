"""The one place that edits transformers KV caches.

transformers changes its cache API between releases (5.24's ``DynamicCache.crop`` takes
only a negative count, 5.23 took a length), so all surgery goes through these helpers and
touches only the per-layer ``keys``/``values`` tensors, shape [batch, heads, seq, dim].

Full-attention layers are :class:`PreallocatedLayer`: they write new entries into spare
room of one buffer (as gpt-fast's and EAGLE's caches do) instead of ``torch.cat``-ing
the whole cache on every forward, and ``keys``/``values`` are views of the filled part.
A commit then copies only the accepted rows, in place; a rollback is a shorter view.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

MIN_CAPACITY = 256  # positions a layer's first buffer holds at least


class PreallocatedLayer(DynamicLayer):
    """A :class:`DynamicLayer` whose entries live in a buffer with room to grow.

    ``keys``/``values`` stay what every transformers cache method reads (the filled part,
    [batch, heads, seq, dim]); they are views of ``_key_buffer``/``_value_buffer``, so
    shortening them (rollback, commit) moves no data and the next :meth:`update` writes
    right after them. A buffer is made twice as long as what it must hold (one copy when
    it grows, amortised over as many positions as it held).
    """

    _key_buffer: torch.Tensor | None = None
    _value_buffer: torch.Tensor | None = None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n = key_states.shape[-2]
        length = self.keys.shape[-2] if self.keys.numel() else 0
        if self._key_buffer is None or length + n > self._key_buffer.shape[-2]:
            self._grow(key_states, value_states, length + n)
        self._key_buffer[:, :, length : length + n] = key_states
        self._value_buffer[:, :, length : length + n] = value_states
        self.keys = self._key_buffer[:, :, : length + n]
        self.values = self._value_buffer[:, :, : length + n]
        return self.keys, self.values

    def _grow(self, key_states: torch.Tensor, value_states: torch.Tensor, needed: int) -> None:
        old = 0 if self._key_buffer is None else self._key_buffer.shape[-2]
        capacity = max(2 * needed, 2 * old, MIN_CAPACITY)  # room for a prefill's continuation
        keys = key_states.new_empty((*key_states.shape[:-2], capacity, key_states.shape[-1]))
        values = value_states.new_empty((*value_states.shape[:-2], capacity, value_states.shape[-1]))
        if self.keys.numel():
            length = self.keys.shape[-2]
            keys[:, :, :length] = self.keys
            values[:, :, :length] = self.values
        self._key_buffer, self._value_buffer = keys, values


def new_cache(config) -> DynamicCache:
    """An empty cache for a model config; its full-attention layers preallocate."""
    cache = DynamicCache(config=config)
    for i, layer in enumerate(cache.layers):
        if type(layer) is DynamicLayer:  # sliding-window and other layer kinds stay as they are
            cache.layers[i] = PreallocatedLayer()
    return cache


def truncate(cache: DynamicCache, length: int) -> None:
    """Keep the first ``length`` positions."""
    for layer in cache.layers:
        if getattr(layer, "keys", None) is None or layer.keys.numel() == 0:
            continue
        layer.keys = layer.keys[:, :, :length]
        layer.values = layer.values[:, :, :length]


def keep_positions(cache: DynamicCache, start: int, keep: torch.Tensor) -> None:
    """Keep positions [0, start) and then ``start + keep`` (in that order); drop the rest.

    This is the commit of an accepted tree path (``keep`` ascending, ``keep[j] >= j``): the
    accepted entries are copied in place to positions ``start ..`` of each layer's own
    storage, which already holds them and the committed context, and the layer is then
    cut to a view. Only the accepted rows move; the committed context is not copied.
    """
    keep = keep.to(torch.long)
    end = start + int(keep.numel())
    with torch.inference_mode():  # the cache holds inference tensors: edit them in that mode
        for layer in cache.layers:
            if getattr(layer, "keys", None) is None or layer.keys.numel() == 0:
                continue
            idx = (start + keep).to(layer.keys.device)
            # index_select copies first, so overlapping source and destination rows are safe
            layer.keys[:, :, start:end] = layer.keys.index_select(2, idx)
            layer.values[:, :, start:end] = layer.values.index_select(2, idx)
            layer.keys = layer.keys[:, :, :end]
            layer.values = layer.values[:, :, :end]
