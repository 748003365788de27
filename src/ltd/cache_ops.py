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

    This is the commit of an accepted tree path: one gather per layer copies the accepted
    entries right after the committed context.
    """
    keep = keep.to(torch.long)
    for layer in cache.layers:
        if getattr(layer, "keys", None) is None or layer.keys.numel() == 0:
            continue
        idx = (start + keep).to(layer.keys.device)
        layer.keys = torch.cat([layer.keys[:, :, :start], layer.keys.index_select(2, idx)], dim=2)
        layer.values = torch.cat([layer.values[:, :, :start], layer.values.index_select(2, idx)], dim=2)
