"""The generic running batch, for architectures the static engine does not cover: any HF causal LM.

Rows are left-padded and share one time axis (server/engine/kv_cache.py, TGI's design); the model's
own forward runs over them with LoRA applied by the wrapped layers (one slot per row, weights
gathered once per batch composition). Prompts are prefilled whole, as many per step as the token
budget allows. Same interface as StaticBatch: add, prefill_chunk, decode, remove.
"""

from __future__ import annotations

import torch
from loraserve.core.lora.layer import LoraBatch, LoraContext
from loraserve.server.engine import kv_cache
from loraserve.server.engine.row import Row
from loraserve.server.engine.sampling import sample_rows


class RunningBatch:
    """Left-padded rows decoded together; the LoRA composition is rebuilt only when rows change."""

    def __init__(self, model, ctx: LoraContext, device: torch.device, num_layers: int, max_rows: int,
                 prefill_tokens: int):
        self.model = model
        self.ctx = ctx
        self.device = device
        self.num_layers = num_layers
        self.max_rows = max_rows
        self.prefill_tokens = prefill_tokens
        self.rows: list[Row] = []  # decoding rows, in cache order
        self._pending: list[Row] = []
        self.last_chunk: list[Row] = []
        self.cache = None
        self.mask: torch.Tensor | None = None  # [B, T] 1 where a row has a token
        self.positions: torch.Tensor | None = None  # [B] position of each row's next token
        self.last_tokens: torch.Tensor | None = None  # [B] token fed to the next decode step
        self.lora: LoraBatch | None = None

    def __len__(self) -> int:
        return len(self.rows) + len(self._pending)

    def add(self, rows: list[Row]) -> None:
        self._pending.extend(rows)

    def _forward(self, input_ids, mask, positions, cache, lora: LoraBatch) -> torch.Tensor:
        self.ctx.batch = lora
        try:
            out = self.model(input_ids=input_ids, attention_mask=mask, position_ids=positions,
                             past_key_values=cache, use_cache=True, logits_to_keep=1)
        finally:
            self.ctx.batch = None
        return out.logits[:, -1, :]  # [B, V]

    def prefill_chunk(self, slot_ranks: list[int]) -> list[tuple[Row, int]]:
        """Whole prompts of pending rows, up to the token budget (at least one row); merges them in."""
        rows, budget = [], self.prefill_tokens
        for row in self._pending:
            n = len(row.request.prompt_ids)
            if rows and n > budget:
                break
            rows.append(row)
            budget -= n
        self.last_chunk = rows
        if not rows:
            return []
        self._pending = self._pending[len(rows):]
        lengths = [len(r.request.prompt_ids) for r in rows]
        width = max(lengths)
        ids = torch.zeros(len(rows), width, dtype=torch.long)
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, width - lengths[i] :] = torch.tensor(row.request.prompt_ids)
            mask[i, width - lengths[i] :] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # [b, L]
        cache = kv_cache.new_cache(self.num_layers)
        slots = [r.slot for r in rows]
        logits = self._forward(ids, mask, positions, cache, LoraBatch(slots, [slot_ranks[s] for s in slots],
                                                                          self.device))
        tokens = sample_rows(logits, rows)
        new_positions = torch.tensor(lengths, dtype=torch.long, device=self.device)
        if self.rows:
            self.cache, self.mask = kv_cache.merge(self.cache, self.mask, cache, mask)
            self.positions = torch.cat([self.positions, new_positions])
            self.last_tokens = torch.cat([self.last_tokens, tokens])
        else:
            self.cache, self.mask, self.positions, self.last_tokens = cache, mask, new_positions, tokens
        self.rows.extend(rows)
        self.lora = None
        return list(zip(rows, tokens.tolist()))

    def decode(self, slot_ranks: list[int]) -> list[tuple[Row, int]]:
        """One token for every decoding row."""
        if not self.rows:
            return []
        if self.lora is None:
            slots = [r.slot for r in self.rows]
            self.lora = LoraBatch(slots, [slot_ranks[s] for s in slots], self.device)
        self.mask = torch.cat([self.mask, self.mask.new_ones(len(self.rows), 1)], dim=1)
        logits = self._forward(self.last_tokens[:, None], self.mask, self.positions[:, None], self.cache, self.lora)
        tokens = sample_rows(logits, self.rows)
        self.last_tokens = tokens
        self.positions = self.positions + 1
        return list(zip(self.rows, tokens.tolist()))

    def remove(self, done: list[Row]) -> None:
        """Drop finished rows; their memory is freed now, not when the batch empties."""
        if not done:
            return
        gone = {id(r) for r in done}
        self._pending = [r for r in self._pending if id(r) not in gone]
        keep = [i for i, r in enumerate(self.rows) if id(r) not in gone]
        if len(keep) == len(self.rows):
            return
        self.rows = [self.rows[i] for i in keep]
        self.lora = None
        if not keep:
            self.cache = self.mask = self.positions = self.last_tokens = None
            return
        index = torch.tensor(keep, dtype=torch.long, device=self.device)
        self.mask = kv_cache.select(self.cache, self.mask, keep)
        self.positions = self.positions.index_select(0, index)
        self.last_tokens = self.last_tokens.index_select(0, index)

    @property
    def all_rows(self) -> list[Row]:
        return self.rows + self._pending
