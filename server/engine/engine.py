"""The engine thread: admits waiting requests into the running batch and steps it (continuous batching).

Each loop iteration takes one device turn (shared fairly with training jobs): it prefills the
requests that can join (their adapter holds a slot, a row is free), then decodes one token for every
row. Requests whose adapter is still on disk wait without holding anyone else up; their load runs
on the registry's worker and wakes the loop when done.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque

import torch
from loraserve.core.errors import (
    InvalidArgument,
    LoraserveError,
    ResourceExhausted,
    Unavailable,
)
from loraserve.core.model.turns import DeviceTurns
from loraserve.server.config import EngineConfig
from loraserve.server.engine.batch import Row, RunningBatch
from loraserve.server.engine.detokenize import TextStream
from loraserve.server.engine.sampling import RowSampler
from loraserve.server.engine.types import (
    Failed,
    Finished,
    GenerationRequest,
    TextDelta,
    Timings,
)
from loraserve.server.lora.registry import DISK, AdapterRegistry

log = logging.getLogger(__name__)


class Engine:
    def __init__(self, base, ctx, registry: AdapterRegistry, config: EngineConfig, turns: DeviceTurns,
                 metrics=None):
        self.base = base
        self.registry = registry
        self.config = config
        self.turns = turns
        self.metrics = metrics
        self.batch = RunningBatch(base.model, ctx, base.device, base.model.config.num_hidden_layers)
        self.eos = set(base.eos_token_ids)
        self.max_prompt_tokens = config.max_prompt_tokens or base.context_window - 1
        self._cond = threading.Condition()
        self._incoming: deque[GenerationRequest] = deque()
        self._waiting: list[GenerationRequest] = []
        self._cancelled: set[str] = set()
        self._wake = False
        self._stopped = False
        self._draining = False
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)

    # --- called from other threads -------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def validate(self, prompt_ids: list[int], max_new_tokens: int) -> None:
        """Reject what can never run, before it takes a place in the queue."""
        if not prompt_ids:
            raise InvalidArgument("the prompt is empty")
        if len(prompt_ids) > self.max_prompt_tokens:
            raise InvalidArgument(
                f"the prompt has {len(prompt_ids)} tokens; the limit is {self.max_prompt_tokens}")
        if max_new_tokens > self.config.max_new_tokens:
            raise InvalidArgument(
                f"max_new_tokens {max_new_tokens} exceeds the server's cap of {self.config.max_new_tokens}")
        window = self.base.context_window
        if len(prompt_ids) + max_new_tokens > window:
            raise InvalidArgument(
                f"prompt ({len(prompt_ids)} tokens) + max_new_tokens ({max_new_tokens}) exceeds the context window "
                f"of {window} tokens")

    def submit(self, request: GenerationRequest) -> None:
        self.validate(request.prompt_ids, request.sampling.max_new_tokens)
        if request.adapter_id:
            self.registry.path_of(request.adapter_id)  # malformed or escaping ids fail now, not in a step
        with self._cond:
            if self._draining or self._stopped:
                raise Unavailable("the server is shutting down; retry on another replica")
            queued = len(self._incoming) + len(self._waiting)
            if queued >= self.config.max_queue:
                raise ResourceExhausted(f"the request queue is full ({self.config.max_queue} waiting); retry later")
            self._incoming.append(request)
            self._wake = True
            self._cond.notify()

    def cancel(self, request_id: str) -> None:
        with self._cond:
            self._cancelled.add(request_id)
            self._wake = True
            self._cond.notify()

    def wake(self) -> None:
        with self._cond:
            self._wake = True
            self._cond.notify()

    def begin_drain(self) -> None:
        with self._cond:
            self._draining = True

    @property
    def in_flight(self) -> int:
        with self._cond:
            return len(self._incoming) + len(self._waiting) + len(self.batch)

    def wait_idle(self, timeout: float) -> bool:
        """Block until no request is queued or running (True), or the timeout passes (False)."""
        with self._cond:
            return self._cond.wait_for(
                lambda: not (self._incoming or self._waiting or len(self.batch)), timeout=timeout)

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify()
        if self._thread.is_alive():
            self._thread.join(timeout=30)

    # --- the engine thread ----------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._stopped and not self._wake and not len(self.batch):
                    self._cond.wait(timeout=self._next_deadline_in())
                    if self._expired_waiting():
                        break
                if self._stopped:
                    break
                self._wake = False
                self._waiting.extend(self._incoming)
                self._incoming.clear()
                cancelled, self._cancelled = self._cancelled, set()
            self._drop_cancelled_and_expired(cancelled)
            try:
                with self.turns.turn(), torch.inference_mode():
                    self._admit()
                    if len(self.batch):
                        self._after_tokens(self.batch.rows, self.batch.decode(self.registry.slot_ranks()))
            except Exception as e:  # noqa: BLE001 - a failed step fails its rows, never the server
                self._fail_batch(e)
            self._report()
            with self._cond:
                self._cond.notify_all()  # wakes wait_idle()
        for req in list(self._waiting) + [r.request for r in self.batch.rows]:
            req.emit(Failed(Unavailable("the server stopped")))

    def _next_deadline_in(self) -> float | None:
        deadlines = [r.deadline for r in self._waiting if r.deadline is not None]
        return max(0.0, min(deadlines) - time.monotonic()) if deadlines else None

    def _expired_waiting(self) -> bool:
        now = time.monotonic()
        return any(r.deadline is not None and r.deadline <= now for r in self._waiting)

    def _drop_cancelled_and_expired(self, cancelled: set[str]) -> None:
        now = time.monotonic()
        still = []
        for req in self._waiting:
            if req.request_id in cancelled:
                req.emit(self._finished_unstarted(req, "cancelled"))
            elif req.deadline is not None and req.deadline <= now:
                req.emit(self._finished_unstarted(req, "deadline"))
            else:
                still.append(req)
        self._waiting = still
        done = []
        for i, row in enumerate(self.batch.rows):
            if row.request.request_id in cancelled:
                row.finish_reason = "cancelled"
            elif row.request.deadline is not None and row.request.deadline <= now:
                row.finish_reason = "deadline"
            if row.finish_reason:
                done.append(i)
        self._finish_rows(done)

    def _finished_unstarted(self, req: GenerationRequest, reason: str) -> Finished:
        waited = time.monotonic() - req.arrival
        return Finished(reason, "", len(req.prompt_ids), 0, Timings(waited, 0.0, waited))

    def _admit(self) -> None:
        free = self.config.max_batch_size - len(self.batch)
        budget = self.config.max_prefill_tokens
        joining: list[Row] = []
        for req in list(self._waiting):
            if free == 0:
                break
            if joining and len(req.prompt_ids) > budget:
                break  # the rest join at the next step; decoding is not stalled by a burst of prompts
            slot = self._slot_for(req)
            if slot is None:
                continue
            self._waiting.remove(req)
            s = req.sampling
            joining.append(Row(req, slot, RowSampler(s.temperature, s.top_p, s.top_k, s.seed, self.base.device),
                               TextStream(self.base.tokenizer, s.stop)))
            budget -= len(req.prompt_ids)
            free -= 1
        if joining:
            if self.metrics:
                for row in joining:
                    self.metrics.observe_queue_time(row.admitted - row.request.arrival)
            try:
                tokens = self.batch.prefill(joining, self.registry.slot_ranks())
            except Exception as e:  # noqa: BLE001 - only the joining rows are lost; the batch is intact
                self._fail_rows(joining, e)
                return
            self._after_tokens(joining, tokens)

    def _slot_for(self, req: GenerationRequest) -> int | None:
        """The request's LoRA slot, or None if it must wait (its adapter is loading or slots are busy)."""
        if not req.adapter_id:
            return 0
        try:
            if self.registry.state(req.adapter_id) == DISK:
                self.registry.request_load(req.adapter_id)
                return None
            return self.registry.acquire_slot(req.adapter_id)
        except LoraserveError as e:  # unknown, unreadable or escaping adapter: this request only
            self._waiting.remove(req)
            req.emit(Failed(e))
            return None

    def _after_tokens(self, rows: list[Row], tokens: list[int]) -> None:
        now = time.monotonic()
        for row, token in zip(rows, tokens):
            if row.finish_reason:
                continue
            if row.first_token is None:
                row.first_token = now
                if self.metrics:
                    self.metrics.observe_first_token(now - row.request.arrival)
            elif self.metrics:
                self.metrics.observe_inter_token(now - row.last_token_at)
            row.last_token_at = now
            row.generated += 1
            if token in self.eos:
                row.finish_reason = "stop"
                continue
            delta = row.stream.add(token)
            if row.stream.stopped:
                row.finish_reason = "stop"
            elif row.generated >= row.request.sampling.max_new_tokens:
                row.finish_reason = "length"
            if delta:
                row.request.emit(TextDelta(delta, row.generated))
        self._finish_rows([i for i, r in enumerate(self.batch.rows) if r.finish_reason])

    def _finish_rows(self, done: list[int]) -> None:
        if not done:
            return
        now = time.monotonic()
        for i in done:
            row = self.batch.rows[i]
            req = row.request
            tail = row.stream.finish() if row.finish_reason in ("stop", "length") else ""
            if tail:
                req.emit(TextDelta(tail, row.generated))
            first = (row.first_token or now) - req.arrival
            timings = Timings(row.admitted - req.arrival, first, now - req.arrival)
            req.emit(Finished(row.finish_reason, row.stream.text, len(req.prompt_ids), row.generated, timings))
            if row.slot:
                self.registry.release_slot(req.adapter_id, row.slot)
            if self.metrics:
                self.metrics.observe_request(timings.total_seconds, len(req.prompt_ids), row.generated,
                                             row.finish_reason)
        self.batch.remove(done)

    def _fail_batch(self, error: Exception) -> None:
        rows = list(self.batch.rows)
        self.batch.remove(list(range(len(rows))))
        self._fail_rows(rows, error)

    def _fail_rows(self, rows: list[Row], error: Exception) -> None:
        log.error("engine step failed; failing %d request(s)", len(rows), exc_info=error)
        if isinstance(error, torch.OutOfMemoryError):
            error = ResourceExhausted(f"out of device memory in a step of {len(rows)} request(s); retry later")
        for row in rows:
            row.request.emit(Failed(error))
            if row.slot:
                self.registry.release_slot(row.request.adapter_id, row.slot)

    def _report(self) -> None:
        if self.metrics:
            with self._cond:
                queued = len(self._incoming) + len(self._waiting)
            self.metrics.set_queue_depth(queued)
            self.metrics.set_running(len(self.batch))
