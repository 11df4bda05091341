"""The running batch: rows, their KV cache and the two pure steps, prefill and decode."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from loraserve.core.lora.layer import LoraBatch, LoraContext
from loraserve.server.engine import kv_cache
from loraserve.server.engine.detokenize import TextStream
from loraserve.server.engine.sampling import RowSampler, sample
from loraserve.server.engine.types import GenerationRequest


@dataclass
class Row:
    request: GenerationRequest
    slot: int
    """LoRA slot (0: base model alone)."""
    sampler: RowSampler
    stream: TextStream
    admitted: float = field(default_factory=time.monotonic)
    first_token: float | None = None
    last_token_at: float = 0.0
    generated: int = 0
    finish_reason: str | None = None


class RunningBatch:
    """Left-padded rows decoded together; the LoRA composition is rebuilt only when rows change."""

    def __init__(self, model, ctx: LoraContext, device: torch.device, num_layers: int):
        self.model = model
        self.ctx = ctx
        self.device = device
        self.num_layers = num_layers
        self.rows: list[Row] = []
        self.cache = None
        self.mask: torch.Tensor | None = None  # [B, T] 1 where a row has a token
        self.positions: torch.Tensor | None = None  # [B] position of each row's next token
        self.last_tokens: torch.Tensor | None = None  # [B] token fed to the next decode step
        self.lora: LoraBatch | None = None

    def __len__(self) -> int:
        return len(self.rows)

    def _forward(self, input_ids, mask, positions, cache, lora: LoraBatch) -> torch.Tensor:
        self.ctx.batch = lora
        try:
            out = self.model(input_ids=input_ids, attention_mask=mask, position_ids=positions,
                             past_key_values=cache, use_cache=True, logits_to_keep=1)
        finally:
            self.ctx.batch = None
        return out.logits[:, -1, :]  # [B, V]

    def prefill(self, rows: list[Row], slot_ranks: list[int]) -> list[int]:
        """Run the prompts of new rows, sample their first token, and merge them into the batch."""
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
        tokens = sample(logits, [r.sampler for r in rows])
        new_positions = torch.tensor(lengths, dtype=torch.long, device=self.device)
        if self.rows:
            self.cache, self.mask = kv_cache.merge(self.cache, self.mask, cache, mask)
            self.positions = torch.cat([self.positions, new_positions])
            self.last_tokens = torch.cat([self.last_tokens, tokens])
        else:
            self.cache, self.mask, self.positions, self.last_tokens = cache, mask, new_positions, tokens
        self.rows.extend(rows)
        self.lora = None
        return tokens.tolist()

    def decode(self, slot_ranks: list[int]) -> list[int]:
        """One token for every row."""
        if self.lora is None:
            slots = [r.slot for r in self.rows]
            self.lora = LoraBatch(slots, [slot_ranks[s] for s in slots], self.device)
        self.mask = torch.cat([self.mask, self.mask.new_ones(len(self.rows), 1)], dim=1)
        logits = self._forward(self.last_tokens[:, None], self.mask, self.positions[:, None], self.cache, self.lora)
        tokens = sample(logits, [r.sampler for r in self.rows])
        self.last_tokens = tokens
        self.positions = self.positions + 1
        return tokens.tolist()

    def remove(self, done: list[int]) -> None:
        """Drop finished rows; their memory is freed now, not when the batch empties."""
        if not done:
            return
        keep = [i for i in range(len(self.rows)) if i not in set(done)]
        self.rows = [self.rows[i] for i in keep]
        self.lora = None
        if not keep:
            self.cache = self.mask = self.positions = self.last_tokens = None
            return
        index = torch.tensor(keep, dtype=torch.long, device=self.device)
        self.mask = kv_cache.select(self.cache, self.mask, keep)
        self.positions = self.positions.index_select(0, index)
        self.last_tokens = self.last_tokens.index_select(0, index)
