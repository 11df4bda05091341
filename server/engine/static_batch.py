"""The static engine's running batch: rows in fixed cache rows, chunked prefill, one decode step per call.

State for every cache row lives in preallocated device tensors (next token, position, LoRA slot,
sampling settings, seed, counter, active); the host writes a row's entries when it joins or leaves
and otherwise only reads the new tokens back, once per step. The decode step is a pure function of
that state and two bucket sizes (rows N, attended length L), so on CUDA it is captured once per
bucket pair and replayed (server/engine/graphs.py).

Prefill runs in chunks under a token budget per step (EngineConfig.max_prefill_tokens): a long prompt
delays the decoding rows by at most one chunk.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from loraserve.core.tasks.heads import SEQ_CLS
from loraserve.server.engine import llama
from loraserve.server.engine.graphs import StepGraphs
from loraserve.server.engine.lora_apply import (
    GatheredLora,
    NoLora,
    SegmentLora,
    TritonLora,
    fuse_groups,
)
from loraserve.server.engine.row import Row
from loraserve.server.engine.sampling import sample, sample_rows
from loraserve.server.engine.static_cache import PrefillPlan, StaticKVCache

log = logging.getLogger(__name__)


@dataclass
class RowState:
    """Per cache row, on the device. Inactive rows (free or still prefilling) decode a throw-away token."""

    tokens: torch.Tensor  # [R] int64: the token fed to the next decode step
    positions: torch.Tensor  # [R] int64: where that token's K/V goes
    slots: torch.Tensor  # [R] int64: LoRA slot (0: none)
    temperature: torch.Tensor  # [R] float32
    top_k: torch.Tensor  # [R] int64
    top_p: torch.Tensor  # [R] float32
    seed: torch.Tensor  # [R] int64
    counter: torch.Tensor  # [R] int64: tokens sampled so far (the RNG stream position)
    active: torch.Tensor  # [R] bool

    @classmethod
    def empty(cls, rows: int, park: int, device: torch.device) -> RowState:
        def t(value, dtype):
            return torch.full((rows,), value, dtype=dtype, device=device)
        return cls(t(0, torch.long), t(park, torch.long), t(0, torch.long), t(0.0, torch.float32),
                   t(0, torch.long), t(1.0, torch.float32), t(0, torch.long), t(0, torch.long), t(False, torch.bool))


def bucket(n: int, limit: int, floor: int = 1) -> int:
    """The power of two >= n (at least floor), capped at limit: few distinct shapes to capture."""
    b = max(floor, 1 << max(0, n - 1).bit_length())
    return min(b, limit)


class StaticBatch:
    retryable = True
    """A failed decode step can run again without some rows: it writes K/V at fixed positions and
    advances the state only at its end."""

    def __init__(self, base, ctx, max_rows: int, max_len: int, prefill_tokens: int, use_graphs: bool | None = None,
                 lora_kernels: bool | None = None):
        self.base = base
        self.ctx = ctx
        self.device = base.device
        self.dtype = base.compute_dtype
        self.max_len = max_len
        self.prefill_tokens = prefill_tokens
        self.parts = llama.LlamaParts(base.model, max_len, self.device, self.dtype)
        self.groups = fuse_groups(self.parts)
        p = self.parts
        self.cache = StaticKVCache(len(p.layers), max_rows, p.num_kv_heads, max_len, p.head_dim, self.dtype,
                                   self.device)
        self.park = max_len - 1  # where inactive rows write (never read while they are inactive)
        self.state = RowState.empty(max_rows, self.park, self.device)
        self.max_rows = max_rows
        self.rows: list[Row] = []
        self._free = list(range(max_rows - 1, -1, -1))  # lowest row first: fills holes, keeps N small
        self._prefilling: list[Row] = []
        self.last_chunk: list[Row] = []
        self.cuda = self.device.type == "cuda"
        # Triton kernels by slot index on CUDA; tests also run them on the CPU (Triton's interpreter).
        self.kernels = self.cuda if lora_kernels is None else lora_kernels
        self.ranks = torch.zeros(len(self.groups[0]["o"].a), dtype=torch.int32, device=self.device)  # [S]
        self._ranks_host: list[int] = []
        self._lora: GatheredLora | SegmentLora | None = None  # CPU decode: rebuilt when rows or slots change
        self._lora_rows = 0
        graphs = self.cuda if use_graphs is None else use_graphs
        self.graphs = StepGraphs(self._decode_step, self._state_tensors) if graphs else None

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def all_rows(self) -> list[Row]:
        return self.rows

    def _state_tensors(self) -> list[torch.Tensor]:
        s = self.state
        return [s.tokens, s.positions, s.slots, s.temperature, s.top_k, s.top_p, s.seed, s.counter, s.active]

    # --- rows joining and leaving --------------------------------------------------------------

    def add(self, rows: list[Row]) -> None:
        """Give each row a cache row; its prompt is prefilled in chunks by the next steps."""
        for row in rows:
            # A decode step spans cache rows 0..top, holes included: task-head rows (prefill only) take the
            # highest free rows, so the decoding rows stay packed at the bottom and no step pays for them.
            row.cache_row = self._free.pop(0) if row.head is not None else self._free.pop()
            row.prefilled = 0
            self.rows.append(row)
            self._prefilling.append(row)

    def remove(self, done: list[Row]) -> None:
        held = {id(r) for r in self.rows}
        done = [r for r in done if id(r) in held]  # a row leaves once: its cache row is freed once
        if not done:
            return
        gone = {id(r) for r in done}
        for row in done:
            i = row.cache_row
            self._park(i)
            self._free.append(i)
        self._free.sort(reverse=True)
        self.rows = [r for r in self.rows if id(r) not in gone]
        self._prefilling = [r for r in self._prefilling if id(r) not in gone]
        self._lora = None

    def _park(self, i: int) -> None:
        s = self.state
        s.active[i] = False
        s.positions[i] = self.park
        s.slots[i] = 0

    def _sync_ranks(self, slot_ranks: list[int]) -> None:
        if slot_ranks != self._ranks_host:
            self._ranks_host = list(slot_ranks)
            self.ranks.copy_(torch.tensor(slot_ranks, dtype=torch.int32))
            self._lora = None

    # --- prefill: one chunk of prompt tokens ---------------------------------------------------

    def prefill_chunk(self, slot_ranks: list[int]) -> list[tuple[Row, int | None]]:
        """Up to the token budget of pending prompt tokens; rows whose prompt completes get a first token,
        task-head rows None (their head's logits are on the row, and they decode nothing)."""
        self._sync_ranks(slot_ranks)
        budget = self.prefill_tokens
        ids, positions, segments, row_slots, slots, done = [], [], [], [], [], []
        t = 0
        self.last_chunk = []
        for row in self._prefilling:
            if budget <= 0:
                break
            prompt = row.request.prompt_ids
            count = min(len(prompt) - row.prefilled, budget)
            start = row.prefilled
            ids.extend(prompt[start : start + count])
            positions.extend(range(start, start + count))
            slots.extend([row.slot] * count)
            segments.append((row.cache_row, start, t, count))
            row_slots.append(row.slot)
            row.prefilled += count
            if row.prefilled == len(prompt):
                done.append((row, t + count - 1))
            self.last_chunk.append(row)
            t += count
            budget -= count
        if not ids:
            return []
        dev = self.device
        ids_t = torch.tensor(ids, dtype=torch.long, device=dev)
        pos_t = torch.tensor(positions, dtype=torch.long, device=dev)
        plan = PrefillPlan(segments, dev)
        if not any(row_slots):
            lora = NoLora()
        elif self.kernels:
            lora = TritonLora(self.groups, torch.tensor(slots, dtype=torch.long, device=dev), self.ranks)
        else:
            lora = self._cpu_lora(row_slots, len(ids), plan)
        scaling = self.parts.scaling

        def attend(i, q, k, v):
            return self.cache.prefill_attend(i, q, k, v, plan, scaling)

        hidden = llama.forward(self.parts, ids_t, pos_t, attend, lora)  # [T, hidden]
        self._apply_heads(hidden, segments)
        self._prefilling = [r for r in self._prefilling if r.prefilled < len(r.request.prompt_ids)]
        out: list[tuple[Row, int | None]] = [(r, None) for r, _ in done if r.head is not None]
        done = [(r, t) for r, t in done if r.head is None]
        if not done:
            return out
        last = torch.tensor([t for _, t in done], dtype=torch.long, device=dev)
        rows = [r for r, _ in done]
        logits = llama.logits(self.parts, hidden.index_select(0, last))  # [D, V]
        tokens = sample_rows(logits, rows)  # their first token: counter 0
        self._start_decoding(rows, tokens)
        return out + list(zip(rows, tokens.tolist()))

    def _apply_heads(self, hidden: torch.Tensor, segments: list[tuple[int, int, int, int]]) -> None:
        """Task-head rows of this chunk: their tokens' hidden states through their own adapter's head.
        seq_cls reads only the prompt's last token; token_cls and qa read every token, chunk by chunk.
        A head is a [labels, hidden] matmul per row: small beside the backbone pass all rows shared."""
        for row, (_, start, t0, count) in zip(self.last_chunk, segments):
            head = row.head
            if head is None:
                continue
            if head.spec.kind == SEQ_CLS:
                if start + count == len(row.request.prompt_ids):
                    row.head_logits.append(head.logits(hidden[t0 + count - 1 : t0 + count]))  # [1, L]
            else:
                row.head_logits.append(head.logits(hidden[t0 : t0 + count]))  # [count, L]

    def _start_decoding(self, rows: list[Row], tokens: torch.Tensor) -> None:
        """The rows' state entries, written once (a few small host-to-device copies per joining batch)."""
        dev = self.device
        index = torch.tensor([r.cache_row for r in rows], dtype=torch.long, device=dev)
        sp = [r.request.sampling for r in rows]
        s = self.state
        s.tokens.index_copy_(0, index, tokens)
        s.positions.index_copy_(0, index, torch.tensor([len(r.request.prompt_ids) for r in rows], device=dev))
        s.slots.index_copy_(0, index, torch.tensor([r.slot for r in rows], device=dev))
        s.temperature.index_copy_(0, index, torch.tensor([x.temperature for x in sp], dtype=torch.float32, device=dev))
        s.top_k.index_copy_(0, index, torch.tensor([x.top_k for x in sp], device=dev))
        s.top_p.index_copy_(0, index, torch.tensor([x.top_p for x in sp], dtype=torch.float32, device=dev))
        s.seed.index_copy_(0, index, torch.tensor([r.seed for r in rows], device=dev))
        s.counter.index_copy_(0, index, torch.ones(len(rows), dtype=torch.long, device=dev))
        s.active.index_fill_(0, index, True)
        for r in rows:
            r.position = len(r.request.prompt_ids)
        self._lora = None

    # --- decode: one token for every decoding row ----------------------------------------------

    def decode(self, slot_ranks: list[int]) -> list[tuple[Row, int]]:
        decoding = [r for r in self.rows if r.position is not None]
        if not decoding:
            return []
        self._sync_ranks(slot_ranks)
        top = max(r.cache_row for r in decoding) + 1
        longest = max(r.position for r in decoding) + 1
        filtered = any(r.request.sampling.filters for r in decoding)
        with_lora = any(r.slot for r in decoding)
        if self.graphs is not None:
            n, length = bucket(top, self.max_rows), bucket(longest, self.max_len, floor=64)
            self.graphs.run(n, length, filtered, with_lora)
        else:
            n, length = top, longest
            self._decode_step(n, length, filtered, with_lora)
        new = self.state.tokens[:n].tolist()  # the one device-to-host copy of the step
        for r in decoding:
            r.position += 1
        return [(r, new[r.cache_row]) for r in decoding]

    def _cpu_lora(self, row_slots: list[int], tokens: int, plan=None) -> GatheredLora | SegmentLora:
        """CPU LoRA for one batch composition (a decode step's rows, or a prefill chunk's with its plan):
        one plain matmul pair when every row has the same adapter (PEFT's best case, no gather), else
        each row's weights gathered once and two bmm."""
        if len(set(row_slots)) == 1:
            return SegmentLora(self.groups, [(row_slots[0], 0, tokens, self._ranks_host[row_slots[0]])])
        rank = max(self._ranks_host[x] for x in row_slots)
        return GatheredLora(self.groups, torch.tensor(row_slots, device=self.device), rank, plan)

    def _decode_step(self, n: int, length: int, filtered: bool, with_lora: bool) -> None:
        """The pure step over self.state[:n]: forward, sample, advance. Captured per (n, length, ...)."""
        s = self.state
        ids, positions = s.tokens[:n], s.positions[:n]
        if not with_lora:
            lora = NoLora()
        elif self.kernels:
            lora = TritonLora(self.groups, s.slots[:n], self.ranks)
        else:
            if self._lora is None or self._lora_rows != n:
                self._lora, self._lora_rows = self._cpu_lora(s.slots[:n].tolist(), n), n
            lora = self._lora
        scaling = self.parts.scaling

        def attend(i, q, k, v):
            return self.cache.decode_attend(i, q, k, v, positions, length, scaling)

        hidden = llama.forward(self.parts, ids, positions, attend, lora)
        new = sample(llama.logits(self.parts, hidden), s.temperature[:n], s.top_k[:n], s.top_p[:n], s.seed[:n],
                     s.counter[:n], filtered)
        act = s.active[:n]
        s.tokens[:n].copy_(new)
        s.positions[:n].add_(act.long())
        s.counter[:n].add_(act.long())
