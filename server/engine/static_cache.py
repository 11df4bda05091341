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

import math
import mmap

import torch
import torch.nn.functional as F


def zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Zeros; on the CPU in anonymous memory that the kernel zero-fills page by page on first touch, so
    a cache sized for the worst case costs memory only where rows actually write. Huge pages are
    refused for it: one write would then zero (and keep) 2 MiB around it (NumPy's calloc, for one,
    asks for huge pages, which cost seconds on the first prefill and gigabytes of resident memory)."""
    if device.type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    count = math.prod(shape)
    buf = mmap.mmap(-1, max(1, count * torch.empty((), dtype=dtype).element_size()))
    if hasattr(mmap, "MADV_NOHUGEPAGE"):
        buf.madvise(mmap.MADV_NOHUGEPAGE)
    return torch.frombuffer(buf, dtype=dtype, count=count).view(shape)


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

    def prefill_attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: PrefillPlan,
                       scaling: float) -> torch.Tensor:
        """Prompt chunks of several rows in one attention call: q/k/v [T, ., D] -> [T, H * D].

        The chunk's tokens are scattered into a padded [rows, H, C, D] query block; each row attends
        over its own cache row up to the end of its chunk, causally with the chunk's offset."""
        heads, d = q.shape[1], q.shape[2]
        self.k[layer][plan.token_rows, :, plan.token_positions] = k
        self.v[layer][plan.token_rows, :, plan.token_positions] = v
        # Cut to the chunk's E positions before gathering the rows: copying whole rows of max_len
        # positions would cost (and, on the CPU, touch) the full cache.
        keys = self.k[layer, :, :, : plan.end].index_select(0, plan.rows)  # [R, KV, E, D]
        values = self.v[layer, :, :, : plan.end].index_select(0, plan.rows)
        qp = q.new_zeros(plan.rows.shape[0], plan.width, heads, d)  # [R, C, H, D]
        qp[plan.token_segment, plan.token_offset] = q
        out = F.scaled_dot_product_attention(qp.transpose(1, 2), keys, values, attn_mask=plan.mask, scale=scaling,
                                             enable_gqa=True)  # [R, H, C, D]
        return out.transpose(1, 2)[plan.token_segment, plan.token_offset].reshape(q.shape[0], heads * d)


class PrefillPlan:
    """Index tensors and the mask of one prefill chunk, built once and shared by every layer.

    segments: (cache row, first position, first token, tokens) per row of the chunk."""

    def __init__(self, segments: list[tuple[int, int, int, int]], device: torch.device):
        self.width = max(count for _, _, _, count in segments)  # C: the longest chunk
        self.end = max(start + count for _, start, _, count in segments)  # E: positions attended
        rows, seg, off, pos, trow = [], [], [], [], []
        for i, (row, start, _, count) in enumerate(segments):
            rows.append(row)
            seg += [i] * count
            off += range(count)
            pos += range(start, start + count)
            trow += [row] * count

        def t(x):
            return torch.tensor(x, dtype=torch.long, device=device)

        self.rows, self.token_segment, self.token_offset = t(rows), t(seg), t(off)
        self.token_positions, self.token_rows = t(pos), t(trow)
        starts = t([start for _, start, _, _ in segments])
        counts = t([count for _, _, _, count in segments])
        i = torch.arange(self.width, device=device)
        j = torch.arange(self.end, device=device)
        # Query i of row r (position start_r + i) sees keys j <= start_r + i. Padding queries (i >=
        # count_r) see key 0 only: never an all-masked row (NaN), and their outputs are dropped.
        causal = j[None, None, :] <= (starts[:, None, None] + i[None, :, None])  # [R, C, E]
        padding = (i[None, :] >= counts[:, None])[:, :, None] & (j[None, None, :] == 0)
        real = (i[None, :] < counts[:, None])[:, :, None]
        self.mask = ((causal & real) | padding)[:, None]  # [R, 1, C, E]
