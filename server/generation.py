"""One generation request as a front end sees it, shared by the gRPC and the OpenAI-compatible HTTP
fronts so both check, batch, cancel and count requests the same way. No protobuf or JSON here.

The prompt is rendered off the event loop (tokenizing can take milliseconds), the request goes to the
engine, its events are awaited here, and the request is cancelled in the engine the moment its caller
goes away (client cancel, deadline, dropped connection), so its row is freed at the next step.
"""

from __future__ import annotations

import asyncio
import math
import uuid
from typing import AsyncIterator, Sequence

from loraserve.core.errors import Cancelled, DeadlineExceeded, InvalidArgument
from loraserve.core.prompt import CHAT, render
from loraserve.core.tasks.heads import GENERATION
from loraserve.server.config import EngineConfig
from loraserve.server.engine.types import Event, Failed, Finished, GenerationRequest, SamplingParams

MAX_STOP_CHARS = 256


def checked_sampling(config: EngineConfig, *, max_new_tokens: int = 0, temperature: float = 0.0,
                     top_p: float = 1.0, top_k: int = 0, seed: int | None = None,
                     stop: Sequence[str] = ()) -> SamplingParams:
    """Sampling values from any front, checked once; max_new_tokens 0 takes the server's default (the
    engine refuses values over its cap, naming it)."""
    if not math.isfinite(temperature) or temperature < 0:
        raise InvalidArgument(f"temperature must be >= 0, got {temperature}")
    if not math.isfinite(top_p) or not 0 < top_p <= 1:
        raise InvalidArgument(f"top_p must lie in (0, 1], got {top_p}")
    if top_k < 0:
        raise InvalidArgument(f"top_k must be >= 0, got {top_k}")
    if max_new_tokens < 0:
        raise InvalidArgument(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if seed is not None and not 0 <= seed < 2**64:
        raise InvalidArgument(f"seed must lie in [0, 2**64), got {seed}")
    if len(stop) > config.max_stop_sequences:
        raise InvalidArgument(f"at most {config.max_stop_sequences} stop sequences are allowed, got {len(stop)}")
    if any(len(s) > MAX_STOP_CHARS for s in stop):
        raise InvalidArgument(f"a stop sequence may have at most {MAX_STOP_CHARS} characters")
    return SamplingParams(max_new_tokens=max_new_tokens or config.default_max_new_tokens,
                          temperature=float(temperature), top_p=float(top_p), top_k=top_k, seed=seed,
                          stop=tuple(s for s in stop if s))


async def generate(engine, tokenizer, metrics, adapter_id: str | None, prompt: str,
                   messages: list[tuple[str, str]], sampling: SamplingParams,
                   deadline: float | None = None, raw_prompt: bool = False) -> AsyncIterator[Event]:
    """Submit one request and yield its TextDelta events and its Finished event. A failure, a deadline
    or a cancel seen by the engine is raised as its error; `deadline` is time.monotonic() based.

    A plain prompt to an adapter is rendered as its training rendered the prompts of its examples
    (the registry reads that from the adapter's metadata), unless raw_prompt asks for the text as is."""
    ids = await asyncio.to_thread(_render, engine, tokenizer, adapter_id, prompt, messages, raw_prompt)
    events = run(engine, metrics, adapter_id, ids, sampling, deadline)
    try:
        async for event in events:
            yield event
    finally:
        await events.aclose()  # now, not when collected: a caller that went away frees its row at once


async def run(engine, metrics, adapter_id: str | None, ids: list[int], sampling: SamplingParams,
              deadline: float | None = None, kind: str = GENERATION) -> AsyncIterator[Event]:
    """Submit token ids as one request of the kind and yield its events (see generate)."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()

    def emit(event):  # called on the engine thread
        try:
            loop.call_soon_threadsafe(queue.put_nowait, event)
        except RuntimeError:  # the event loop is gone (server stopped): nobody is listening
            pass

    request = GenerationRequest(uuid.uuid4().hex, adapter_id, ids, sampling, emit, deadline, kind=kind)
    engine.submit(request)
    metrics.observe_adapter_request(adapter_id or "")
    finished = False
    try:
        while True:
            event = await queue.get()
            if isinstance(event, Failed):
                finished = True
                raise event.error
            if isinstance(event, Finished):
                finished = True
                if event.reason == "deadline":
                    raise DeadlineExceeded("the request's deadline passed before generation finished")
                if event.reason == "cancelled":
                    raise Cancelled("the request was cancelled")
            yield event
            if isinstance(event, Finished):
                return
    finally:
        if not finished:  # the caller went away (cancel, deadline, closed connection): free the row now
            engine.cancel(request.request_id)


def _render(engine, tokenizer, adapter_id: str | None, prompt: str, messages, raw_prompt: bool) -> list[int]:
    as_chat = bool(prompt and adapter_id and not raw_prompt and not messages
                   and engine.registry.prompt_rendering(adapter_id) == CHAT)
    return render(tokenizer, prompt, messages, engine.max_prompt_tokens, prompt_as_chat=as_chat)
