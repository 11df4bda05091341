"""The static engine's KV cache: one preallocated slot of max_len positions per row, and attention over it.

Rows keep their cache row from admission to finish, so rows join and leave by index and no other
row's cache is ever copied. A decode step runs over cache rows [0, N) (N a bucket of the highest row
in use): a free row inside that range is a hole that computes a throw-away token, written at the
last position (never read while the row is free; a new row's prefill overwrites what it needs).
Attention reads only the first L positions (L a bucket of the longest row), each row masked to its
own length, so the shapes of a decode step depend on (N, L) alone and it can be captured once per
bucket pair.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Zeros; on the CPU from calloc'd pages, so a cache sized for the worst case costs memory only
    where rows actually write (torch.zeros would touch every page)."""
    np_dtype = {torch.float32: np.float32, torch.float16: np.float16, torch.float64: np.float64}.get(dtype)
    if device.type == "cpu" and np_dtype is not None:
        return torch.from_numpy(np.zeros(shape, dtype=np_dtype))
    return torch.zeros(shape, dtype=dtype, device=device)


class StaticKVCache:
    def __init__(self, layers: int, rows: int, kv_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device):
        self.rows = rows
        self.max_len = max_len
        # [layers, rows, kv_heads, max_len, head_dim]; zeros so that a hole never holds NaN/inf.
        shape = (layers, rows, kv_heads, max_len, head_dim)
        self.k = zeros(shape, dtype, device)
        self.v = zeros(shape, dtype, device)
        self.row_index = torch.arange(rows, device=device)
        self.pos_index = torch.arange(max_len, device=device)

    @staticmethod
    def bytes_per_row(layers: int, kv_heads: int, max_len: int, head_dim: int, dtype: torch.dtype) -> int:
        return 2 * layers * kv_heads * max_len * head_dim * torch.empty((), dtype=dtype).element_size()

    def decode_attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      positions: torch.Tensor, length: int, scaling: float) -> torch.Tensor:
        """One token per cache row [0, N): q [N, H, D], k/v [N, KV, D] at `positions` [N] -> [N, H * D]."""
        n, heads, d = q.shape
        kv = k.shape[1]
        rows = self.row_index[:n]
        self.k[layer][rows, :, positions] = k
        self.v[layer][rows, :, positions] = v
        keys = self.k[layer, :n, :, :length]  # [N, KV, L, D]
        values = self.v[layer, :n, :, :length]
        # Grouped-query attention without repeating K/V: the G query heads that share a KV head are
        # attended as G queries of one head (they sit at the same position, so one mask serves all).
        q = q.view(n, kv, heads // kv, d)  # [N, KV, G, D]
        mask = (self.pos_index[:length][None, :] <= positions[:, None])[:, None, None, :]  # [N, 1, 1, L]
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=scaling)
        return out.reshape(n, heads * d)

    def prefill_attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       segments: list[tuple[int, int, int, int]], scaling: float) -> torch.Tensor:
        """Prompt chunks: segments (cache row, first position, first token, tokens) over q/k/v [T, ., D]."""
        heads, d = q.shape[1], q.shape[2]
        out = torch.empty(q.shape[0], heads * d, dtype=q.dtype, device=q.device)
        for row, start, t0, count in segments:
            end = start + count
            self.k[layer, row, :, start:end] = k[t0 : t0 + count].transpose(0, 1)
            self.v[layer, row, :, start:end] = v[t0 : t0 + count].transpose(0, 1)
            keys = self.k[layer, row : row + 1, :, :end]  # [1, KV, end, D]
            values = self.v[layer, row : row + 1, :, :end]
            qs = q[t0 : t0 + count].transpose(0, 1)[None]  # [1, H, count, D]
            # Causal with an offset: query i (at position start + i) sees positions <= start + i.
            mask = self.pos_index[:end][None, :] <= (start + self.pos_index[:count])[:, None]  # [count, end]
            o = F.scaled_dot_product_attention(qs, keys, values, attn_mask=mask, scale=scaling, enable_gqa=True)
            out[t0 : t0 + count] = o[0].transpose(0, 1).reshape(count, heads * d)
        return out
