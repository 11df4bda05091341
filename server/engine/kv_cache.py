"""The running batch's KV cache: left-padded rows that share one time axis (TGI's design).

Rows are aligned on the right, so every decode step writes the new token at the same column for all
rows and the model's own 2-D padding mask handles the rest. Requests join by concatenation (the
shorter side is left-padded) and leave by row selection; padding columns that no row needs any more
are trimmed. Each layer keeps spare capacity so a decode step writes in place instead of re-copying
the whole cache (what DynamicLayer's torch.cat would do every step).
"""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer


class GrowingLayer(DynamicLayer):
    """A DynamicLayer whose keys/values are views into a buffer with room to grow."""

    def __init__(self, keys: torch.Tensor | None = None, values: torch.Tensor | None = None):
        super().__init__()
        self._k = self._v = None
        self._len = 0
        if keys is not None:
            self._set(keys, values, spare=16)

    def _set(self, keys: torch.Tensor, values: torch.Tensor, spare: int) -> None:
        b, h, t, d = keys.shape
        self._k = keys.new_empty(b, h, t + spare, d)
        self._v = values.new_empty(b, h, t + spare, values.shape[-1])
        self._k[:, :, :t].copy_(keys)
        self._v[:, :, :t].copy_(values)
        self._len = t
        self.dtype, self.device = keys.dtype, keys.device
        self.is_initialized = True
        self._views()

    def _views(self) -> None:
        self.keys = self._k[:, :, : self._len]
        self.values = self._v[:, :, : self._len]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        n = key_states.shape[-2]
        if self._k is None:
            self._set(key_states, value_states, spare=max(16, n // 4))
            return self.keys, self.values
        if self._len + n > self._k.shape[2]:
            # Grow geometrically: amortised O(1) copies per generated token.
            self._set(self.keys, self.values, spare=max(n, self._len // 2, 16))
        self._k[:, :, self._len : self._len + n].copy_(key_states)
        self._v[:, :, self._len : self._len + n].copy_(value_states)
        self._len += n
        self._views()
        return self.keys, self.values

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._set(self.keys.index_select(0, indices), self.values.index_select(0, indices), spare=16)

    def drop_left(self, columns: int) -> None:
        self._set(self.keys[:, :, columns:], self.values[:, :, columns:], spare=16)


def new_cache(num_layers: int) -> DynamicCache:
    cache = DynamicCache()
    cache.layers = [GrowingLayer() for _ in range(num_layers)]
    cache.layer_class_to_replicate = None
    return cache


def _left_pad(t: torch.Tensor, length: int) -> torch.Tensor:
    missing = length - t.shape[2]
    if missing == 0:
        return t
    pad = t.new_zeros(t.shape[0], t.shape[1], missing, t.shape[3])
    return torch.cat([pad, t], dim=2)


def merge(a: DynamicCache, a_mask: torch.Tensor, b: DynamicCache, b_mask: torch.Tensor):
    """Rows of b appended after the rows of a; both right-aligned on a common time axis."""
    t = max(a_mask.shape[1], b_mask.shape[1])
    layers = []
    for la, lb in zip(a.layers, b.layers):
        keys = torch.cat([_left_pad(la.keys, t), _left_pad(lb.keys, t)], dim=0)
        values = torch.cat([_left_pad(la.values, t), _left_pad(lb.values, t)], dim=0)
        layers.append(GrowingLayer(keys, values))
    cache = new_cache(0)
    cache.layers = layers

    def pad_mask(m):
        return torch.cat([m.new_zeros(m.shape[0], t - m.shape[1]), m], dim=1)

    return cache, torch.cat([pad_mask(a_mask), pad_mask(b_mask)], dim=0)


def select(cache: DynamicCache, mask: torch.Tensor, keep: list[int]) -> torch.Tensor:
    """Keep only the given rows (in place) and trim columns no remaining row attends to."""
    index = torch.tensor(keep, dtype=torch.long, device=mask.device)
    mask = mask.index_select(0, index)
    used = mask.any(dim=0)
    first = int(used.nonzero()[0]) if bool(used.any()) else mask.shape[1]
    for layer in cache.layers:
        layer.batch_select_indices(index)
        if first:
            layer.drop_left(first)
    return mask[:, first:]
