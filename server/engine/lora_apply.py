"""Adding each token's LoRA adapter inside the static forward, by slot index.

The wrapped projections hold slot-stacked weights (core/lora/layer.py): A [S, R, in], B [S, out, R],
scaling folded into B, slot 0 all zeros. Projections that read the same input share one A buffer
(q/k/v: [S, 3R, in]; gate/up: [S, 2R, in]); each projection's lora_a becomes a view of its block, so
the registry writes slots exactly as before and a step shrinks once per group.

Three ways to add the delta, picked per step by the batch:
- TritonLora (CUDA): one shrink and one expand kernel per projection over a per-token slot index;
  nothing per row is copied and a slot costs its own rank (server/lora/ops.py).
- GatheredLora (CPU, rows of several adapters): each row's A and B, cut to the batch's largest rank,
  are gathered once per batch composition (rows change far less often than steps) and applied with
  two bmm per group; a prefill chunk is padded to [rows, C, in] for that.
- SegmentLora (CPU, every token on one adapter): one plain matmul pair per projection.
NoLora when no token has an adapter: rows without one cost nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from loraserve.server.engine.llama import GATE_UP, QKV, LlamaParts


@dataclass
class Group:
    a: torch.Tensor  # [S, G * R, in]
    bs: list[torch.Tensor]  # G x [S, out_g, R]
    rank: int  # R: rows of one projection's block in a


def fuse_groups(parts: LlamaParts) -> list[dict[str, Group]]:
    """Per layer: qkv, o, gate_up, down groups; re-points q/k/v and gate/up lora_a at one shared buffer."""
    layers = []
    for layer in parts.layers:
        groups = {}
        for name, projs in (("qkv", (layer.q, layer.k, layer.v)), ("o", (layer.o,)),
                            ("gate_up", (layer.gate, layer.up)), ("down", (layer.down,))):
            if not all(hasattr(p, "lora_a") for p in projs):
                raise ValueError(f"projection group {name} is not LoRA-wrapped; the static engine needs all of "
                                 f"{QKV + ('o_proj',) + GATE_UP + ('down_proj',)} wrapped")
            r = projs[0].lora_a.shape[1]
            if len(projs) > 1:
                fused = torch.cat([p.lora_a for p in projs], dim=1)  # [S, G*R, in], keeps what is written
                for g, p in enumerate(projs):
                    p.lora_a = fused[:, g * r : (g + 1) * r]  # buffer re-pointed: registry writes land here
            a = projs[0].lora_a if len(projs) == 1 else fused
            groups[name] = Group(a, [p.lora_b for p in projs], r)
        layers.append(groups)
    return layers


class NoLora:
    def add(self, layer, group, x, outs) -> None:
        pass


class GatheredLora:
    """CPU: each row's weights gathered once per composition (cached), two bmm per group.

    Decode: one token per row. Prefill: the chunk's tokens are scattered into a padded
    [rows, C, in] block (the prefill plan's indices), so a chunk of many rows is still two bmm per
    group, not two matmuls per row."""

    def __init__(self, groups: list[dict[str, Group]], slots: torch.Tensor, rank: int, plan=None):
        self.groups = groups
        self.slots = slots  # [N] int64, one per row
        self.rank = rank  # the batch's largest rank; weights beyond a slot's rank are zeros
        self.plan = plan  # PrefillPlan, or None for decode
        self._cache: dict[tuple[int, str], tuple[torch.Tensor, list[torch.Tensor]]] = {}

    def _weights(self, layer: int, name: str):
        got = self._cache.get((layer, name))
        if got is None:
            grp = self.groups[layer][name]
            r, n = self.rank, len(grp.bs)
            cols = torch.cat([torch.arange(g * grp.rank, g * grp.rank + r) for g in range(n)]).to(grp.a.device)
            a = grp.a.index_select(0, self.slots).index_select(1, cols)  # [N, G*r, in]
            bs = [b.index_select(0, self.slots)[:, :, :r].transpose(1, 2).contiguous() for b in grp.bs]  # [N, r, out]
            got = (a.transpose(1, 2).contiguous(), bs)  # [N, in, G*r]
            self._cache[(layer, name)] = got
        return got

    def add(self, layer, group, x, outs) -> None:
        a, bs = self._weights(layer, group)
        plan = self.plan
        if plan is None:
            xp = x[:, None, :]  # [N, 1, in]
        else:
            xp = x.new_zeros(plan.rows.shape[0], plan.width, x.shape[-1])  # [R, C, in]
            xp[plan.token_segment, plan.token_offset] = x
        h = torch.bmm(xp.to(a.dtype), a)  # [R, C, G*r]
        r = self.rank
        for g, y in enumerate(outs):
            d = torch.bmm(h[:, :, g * r : (g + 1) * r], bs[g])  # [R, C, out]
            y += (d[:, 0] if plan is None else d[plan.token_segment, plan.token_offset]).to(y.dtype)


class SegmentLora:
    """Prefill on CPU: runs of tokens with one slot; segments (slot, first token, tokens, rank)."""

    def __init__(self, groups: list[dict[str, Group]], segments: list[tuple[int, int, int, int]]):
        self.groups = groups
        self.segments = [s for s in segments if s[0] != 0 and s[3] > 0]

    def add(self, layer, group, x, outs) -> None:
        grp = self.groups[layer][group]
        for slot, t0, count, r in self.segments:
            xs = x[t0 : t0 + count]
            for g, y in enumerate(outs):
                a = grp.a[slot, g * grp.rank : g * grp.rank + r]  # [r, in]
                b = grp.bs[g][slot, :, :r]  # [out, r]
                y[t0 : t0 + count] += ((xs.to(a.dtype) @ a.t()) @ b.t()).to(y.dtype)


class TritonLora:
    """Shrink once per group, expand per projection, by per-token slot index (idx [T], ranks [S]).

    The tokens are grouped by slot once per step (ops.lora_meta) and every layer reuses that."""

    def __init__(self, groups: list[dict[str, Group]], idx: torch.Tensor, ranks: torch.Tensor):
        from loraserve.server.lora import ops

        self.ops = ops
        self.groups = groups
        self.idx = idx
        self.ranks = ranks
        self.meta = ops.lora_meta(idx, ranks.shape[-1])

    def add(self, layer, group, x, outs) -> None:
        grp = self.groups[layer][group]
        h = self.ops.lora_shrink(x, grp.a, self.idx, self.ranks, len(grp.bs), meta=self.meta)
        for g, y in enumerate(outs):
            self.ops.lora_expand(y, h, grp.bs[g], self.idx, self.ranks, g, meta=self.meta)
