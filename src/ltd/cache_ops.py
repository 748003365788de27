"""The one place that edits transformers KV caches.

transformers changes its cache API between releases (5.24's ``DynamicCache.crop`` takes
only a negative count, 5.23 took a length), so all surgery goes through these helpers and
touches only the per-layer ``keys``/``values`` tensors, shape [batch, heads, seq, dim].
"""

from __future__ import annotations

import torch
from transformers import DynamicCache


def new_cache(config) -> DynamicCache:
    """An empty dynamic cache for a model config."""
    return DynamicCache(config=config)


def cache_length(cache: DynamicCache) -> int:
    """Tokens held by the cache."""
    return int(cache.get_seq_length())


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
