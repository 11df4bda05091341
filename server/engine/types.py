"""The engine's request and event types: plain dataclasses, no protobuf."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from loraserve.core.tasks.heads import GENERATION, HeadSpec


# A cancel that reaches the server this close to the request's deadline is taken as the deadline: the
# client's deadline and the server's copy of it fire together, and the client's reset often arrives a
# few milliseconds first (see server/service/deadlines.py).
DEADLINE_SLACK = 0.05


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int
    temperature: float = 0.0
    """0 means greedy."""
    top_p: float = 1.0
    top_k: int = 0
    """0 means no top-k cut."""
    seed: int | None = None
    stop: tuple[str, ...] = ()

    @property
    def filters(self) -> bool:
        """Whether top-k or top-p cuts the distribution (the sampler's full-vocabulary sort is then needed)."""
        return self.top_k > 0 or self.top_p < 1.0


@dataclass
class Timings:
    queue_seconds: float = 0.0
    first_token_seconds: float = 0.0
    total_seconds: float = 0.0


@dataclass(frozen=True)
class TextDelta:
    text: str
    token_count: int
    """Tokens generated so far."""


@dataclass(frozen=True)
class Finished:
    reason: str
    """stop | length | cancelled | deadline"""
    text: str
    prompt_tokens: int
    generated_tokens: int
    timings: Timings
    head_logits: torch.Tensor | None = None
    """A task-head request: its head's logits on the CPU, float32: [1, labels] for seq_cls (the last
    token), [prompt tokens, labels] for token_cls and qa. None for generation."""
    head: HeadSpec | None = None
    """The spec of the head that produced head_logits (labels, threshold): the one the row ran on."""


@dataclass(frozen=True)
class Failed:
    error: Exception


Event = TextDelta | Finished | Failed


@dataclass
class GenerationRequest:
    request_id: str
    adapter_id: str | None
    prompt_ids: list[int]
    sampling: SamplingParams
    emit: Callable[[Event], None]
    """Called from the engine thread; must not block."""
    deadline: float | None = None
    """time.monotonic() after which the request finishes with reason 'deadline'."""
    arrival: float = field(default_factory=time.monotonic)
    kind: str = GENERATION
    """generation, or the task-head kind the adapter must have (core.tasks.heads): such a request is
    prefilled only, and ends with its head's logits instead of generated tokens."""
