"""One request while it holds a row of the running batch (either engine)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from loraserve.core.tasks.heads import TaskHead
from loraserve.server.engine.detokenize import TextStream
from loraserve.server.engine.types import GenerationRequest


@dataclass(eq=False)
class Row:
    request: GenerationRequest
    slot: int
    """LoRA slot (0: base model alone)."""
    stream: TextStream
    seed: int
    """The row's sampling stream: the request's seed, or a random one."""
    admitted: float = field(default_factory=time.monotonic)
    first_token: float | None = None
    last_token_at: float = 0.0
    generated: int = 0
    finish_reason: str | None = None
    cache_row: int = -1
    """Static engine: the KV-cache row held from admission to finish."""
    prefilled: int = 0
    """Prompt tokens already in the cache (chunked prefill)."""
    position: int | None = None
    """Position of the token fed to the next decode step; None while the prompt is being prefilled."""
    head: TaskHead | None = None
    """A task-head request's head (from its adapter's slot); the row leaves after its prefill."""
    head_logits: list[torch.Tensor] = field(default_factory=list)
    """The head's logits of each prefilled chunk, [chunk tokens or 1, labels], on the device."""
