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
    FailedPrecondition,
    InvalidArgument,
    LoraserveError,
    ResourceExhausted,
    Unavailable,
)
from loraserve.core.model.turns import DeviceTurns
from loraserve.core.tasks.heads import GENERATION, QA, SEQ_CLS, TOKEN_CLS, TaskHead
from loraserve.server.config import EngineConfig
from loraserve.server.engine import llama
from loraserve.server.engine.batch import RunningBatch
from loraserve.server.engine.detokenize import TextStream
from loraserve.server.engine.output import Output
from loraserve.server.engine.row import Row
from loraserve.server.engine.sampling import new_seed
from loraserve.server.engine.static_batch import StaticBatch
from loraserve.server.engine.static_cache import StaticKVCache
from loraserve.server.engine.types import (
    DEADLINE_SLACK,
    Failed,
    Finished,
    GenerationRequest,
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
        self.window = min(base.context_window, config.max_seq_len)
        self.batch = self._make_batch(base, ctx, config)
        self.eos = set(base.eos_token_ids)
        self.max_prompt_tokens = min(config.max_prompt_tokens or self.window - 1, self.window - 1)
        self._cond = threading.Condition()
        self._incoming: deque[GenerationRequest] = deque()
        self._waiting: list[GenerationRequest] = []
        self._cancelled: set[str] = set()
        self._text_stopped: set[str] = set()  # rows whose text hit a stop sequence (found by the output thread)
        self.output = Output(self._stop_text)
        self._wake = False
        self._rows_freed = False  # rows left the batch: waiting requests may fit now
        self._stopped = False
        self._draining = False
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)

    def _make_batch(self, base, ctx, config: EngineConfig):
        """The static engine for Llama-family decoders, the generic one for everything else."""
        if not config.static_engine or not llama.supports(base.model):
            log.info("engine: generic (left-padded cache, the model's own forward)")
            return RunningBatch(base.model, ctx, base.device, base.model.config.num_hidden_layers,
                                config.max_batch_size, config.max_prefill_tokens)
        cfg = base.model.config
        per_row = StaticKVCache.bytes_per_row(cfg.num_hidden_layers, cfg.num_key_value_heads, self.window,
                                              llama.head_dim(cfg), base.compute_dtype)
        rows = config.max_batch_size
        if base.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(base.device)
            fits = int(free * config.kv_cache_fraction) // per_row
            if fits < 1:
                raise ValueError(f"no room for one KV-cache row of {self.window} positions ({per_row >> 20} MiB): "
                                 "lower --max-seq-len or raise --kv-cache-fraction")
            if fits < rows:
                log.warning("KV cache: room for %d rows of %d positions; --max-batch-size %d is capped to %d",
                            fits, self.window, rows, fits)
            rows = min(rows, fits)
        log.info("engine: static (%d rows x %d positions, %.1f GiB KV cache%s)", rows, self.window,
                 rows * per_row / 2**30, "" if base.device.type == "cuda" else ", taken as rows write")
        return StaticBatch(base, ctx, rows, self.window, config.max_prefill_tokens)

    # --- called from other threads -------------------------------------------------------------

    def start(self) -> None:
        self._report()  # the gauges hold their idle values (and the slot count) before the first step
        self.output.start()
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
        window = self.window
        if len(prompt_ids) + max_new_tokens > window:
            raise InvalidArgument(
                f"prompt ({len(prompt_ids)} tokens) + max_new_tokens ({max_new_tokens}) exceeds the sequence "
                f"limit of {window} tokens (the model's context window, capped by --max-seq-len)")

    def submit(self, request: GenerationRequest) -> None:
        self.validate(request.prompt_ids, request.sampling.max_new_tokens)
        if request.kind != GENERATION and not isinstance(self.batch, StaticBatch):
            raise FailedPrecondition(f"{request.kind} adapters are served by the static engine only (Llama-family "
                                     "bases, --static-engine on); this server runs the generic engine")
        if request.adapter_id:
            self.registry.path_of(request.adapter_id)  # malformed or escaping ids fail now, not in a step
        with self._cond:
            if self._draining or self._stopped:
                raise Unavailable("the server is shutting down; retry on another replica")
            queued = len(self._incoming) + len(self._waiting)
            if queued >= self.config.max_queue:
                raise ResourceExhausted(f"the request queue is full ({self.config.max_queue} waiting); retry later")
            self._incoming.append(request)
            if self.metrics:  # under the lock: a scrape never shows more finished than admitted
                self.metrics.request_admitted()
            self._wake = True
            self._cond.notify()

    def cancel(self, request_id: str) -> None:
        with self._cond:
            self._cancelled.add(request_id)
            self._wake = True
            self._cond.notify()

    def _stop_text(self, request_id: str) -> None:
        with self._cond:
            self._text_stopped.add(request_id)
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
        deadline = time.monotonic() + timeout
        with self._cond:
            idle = self._cond.wait_for(
                lambda: not (self._incoming or self._waiting or len(self.batch)), timeout=timeout)
        return idle and self.output.wait_delivered(max(0.0, deadline - time.monotonic()))

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify()
        if self._thread.is_alive():
            self._thread.join(timeout=30)
        self.output.stop()

    # --- the engine thread ----------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._cond:
                while not (self._stopped or self._wake or len(self.batch) or (self._rows_freed and self._waiting)):
                    self._cond.wait(timeout=self._next_deadline_in())
                    if self._expired_waiting():
                        break
                if self._stopped:
                    break
                self._wake = self._rows_freed = False
                self._waiting.extend(self._incoming)
                self._incoming.clear()
                cancelled, self._cancelled = self._cancelled, set()
                text_stopped, self._text_stopped = self._text_stopped, set()
            self._drop_cancelled_and_expired(cancelled, text_stopped)
            try:
                with self.turns.turn(), torch.inference_mode():
                    self._admit()
                    self._prefill()
                    if len(self.batch):
                        self._decode()
            except Exception as e:  # noqa: BLE001 - a failed step fails its rows, never the server
                self._fail_batch(e)
            self._report()
            with self._cond:
                self._cond.notify_all()  # wakes wait_idle()
        with self._cond:
            left = [*self._incoming, *self._waiting]
        for req in left + [r.request for r in self.batch.all_rows]:
            self._fail(req, Unavailable("the server stopped"))

    def _next_deadline_in(self) -> float | None:
        deadlines = [r.deadline for r in self._waiting if r.deadline is not None]
        return max(0.0, min(deadlines) - time.monotonic()) if deadlines else None

    def _expired_waiting(self) -> bool:
        now = time.monotonic()
        return any(r.deadline is not None and r.deadline <= now for r in self._waiting)

    def _drop_cancelled_and_expired(self, cancelled: set[str], text_stopped: set[str]) -> None:
        # A deadline that has passed wins over a cancel: gRPC cancels the call when its deadline hits,
        # and that request ended by its deadline, as the client saw (DEADLINE_EXCEEDED). The client's
        # reset can beat our copy of its deadline by a hair: a cancel that close to it is the deadline.
        now = time.monotonic()

        def ended(req: GenerationRequest) -> str | None:
            if req.deadline is not None and req.deadline <= now:
                return "deadline"
            if req.request_id not in cancelled:
                return None
            return "deadline" if req.deadline is not None and req.deadline <= now + DEADLINE_SLACK else "cancelled"

        still = []
        for req in self._waiting:
            reason = ended(req)
            if reason:
                self.output.emit(req, self._finished_unstarted(req, reason))
            else:
                still.append(req)
        self._waiting = still
        for row in self.batch.all_rows:
            if row.finish_reason:
                continue
            if row.request.request_id in text_stopped:
                row.finish_reason = "stop"
            else:
                row.finish_reason = ended(row.request)
        self._finish_rows()

    def _finished_unstarted(self, req: GenerationRequest, reason: str) -> Finished:
        """A request that ends while still queued: counted in the metrics like every other ending."""
        waited = time.monotonic() - req.arrival
        if self.metrics:
            self.metrics.observe_request(waited, 0, 0, reason)  # its prompt was never processed
        return Finished(reason, "", len(req.prompt_ids), 0, Timings(waited, 0.0, waited))

    def _admit(self) -> None:
        """Waiting requests whose adapter holds a slot take free rows; their prompts prefill in later chunks."""
        free = self.batch.max_rows - len(self.batch)
        joining: list[Row] = []
        for req in list(self._waiting):
            if free == 0:
                break
            slot = self._slot_for(req)
            if slot is None:
                continue
            self._waiting.remove(req)
            head = self.registry.slot_head(slot) if slot else None
            mismatch = _kind_mismatch(req, head)
            if mismatch is not None:
                self.registry.release_slot(req.adapter_id, slot)
                self._fail(req, mismatch)
                continue
            seed = req.sampling.seed if req.sampling.seed is not None else new_seed()
            seed = seed - (1 << 64) if seed >= 1 << 63 else seed  # any uint64 the API takes, as an int64 tensor
            joining.append(Row(req, slot, TextStream(self.base.tokenizer, req.sampling.stop), seed, head=head))
            free -= 1
        if joining:
            if self.metrics:
                for row in joining:
                    self.metrics.observe_queue_time(row.admitted - row.request.arrival)
            self.batch.add(joining)

    def _prefill(self) -> None:
        """One chunk of pending prompt tokens; a failure here fails that chunk's rows only."""
        try:
            out = self.batch.prefill_chunk(self.registry.slot_ranks())
        except Exception as e:  # noqa: BLE001 - only the rows of this chunk are lost; the batch is intact
            rows = list(self.batch.last_chunk)
            self.batch.remove(rows)
            self._fail_rows(rows, e)
            return
        self._after_tokens(out)

    def _decode(self) -> None:
        """One token for every decoding row. A step that fails is retried without its newest row (which
        fails alone), so one request that breaks the step cannot take the others down with it; only the
        static batch can retry (its step writes at fixed positions and advances the state last)."""
        while True:
            try:
                out = self.batch.decode(self.registry.slot_ranks())
                break
            except Exception as e:  # noqa: BLE001 - narrowed down below, then the rest fail
                decoding = [r for r in self.batch.all_rows if r.first_token is not None]
                if not getattr(self.batch, "retryable", False) or len(decoding) <= 1:
                    raise
                newest = max(decoding, key=lambda r: r.admitted)
                log.warning("decode step failed; retrying without the newest request %s",
                            newest.request.request_id)
                self.batch.remove([newest])
                self._fail_rows([newest], e)
        self._after_tokens(out)

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
            self._fail(req, e)
            return None

    def _after_tokens(self, out: list[tuple[Row, int]]) -> None:
        now = time.monotonic()
        text: list[tuple[Row, int]] = []
        for row, token in out:
            if row.finish_reason:
                continue
            if token is None:  # a task-head row: its prefill was the whole request
                row.first_token = row.last_token_at = now
                row.finish_reason = "stop"
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
            text.append((row, token))  # detokenized and streamed by the output thread
            if row.generated >= row.request.sampling.max_new_tokens:
                row.finish_reason = "length"
        self.output.tokens(text)
        self._finish_rows()

    def _finish_rows(self) -> None:
        done = [r for r in self.batch.all_rows if r.finish_reason]
        if not done:
            return
        now = time.monotonic()
        for row in done:
            req = row.request
            first = (row.first_token or now) - req.arrival
            timings = Timings(row.admitted - req.arrival, first, now - req.arrival)
            self.output.finish(row, timings)
            if row.slot:
                self.registry.release_slot(req.adapter_id, row.slot)
            if self.metrics:
                self.metrics.observe_request(timings.total_seconds, len(req.prompt_ids), row.generated,
                                             row.finish_reason)
        self.batch.remove(done)
        self._rows_freed = True

    def _fail_batch(self, error: Exception) -> None:
        rows = list(self.batch.all_rows)
        self.batch.remove(rows)
        self._fail_rows(rows, error)

    def _fail_rows(self, rows: list[Row], error: Exception) -> None:
        log.error("engine step failed; failing %d request(s)", len(rows), exc_info=error)
        if isinstance(error, torch.OutOfMemoryError):
            error = ResourceExhausted(f"out of device memory in a step of {len(rows)} request(s); retry later")
        for row in rows:
            self._fail(row.request, error, row.generated)
            if row.slot:
                self.registry.release_slot(row.request.adapter_id, row.slot)
        self._rows_freed = True

    def _fail(self, req: GenerationRequest, error: Exception, generated: int = 0) -> None:
        """End a request with an error; counted under the finish reason "error", so every request the
        engine admitted shows in requests_finished_total exactly once."""
        if self.metrics:
            # prompt_tokens_total counts prompts processed: a request failing before its first token had none.
            processed = len(req.prompt_ids) if generated else 0
            self.metrics.observe_request(time.monotonic() - req.arrival, processed, generated, "error")
        self.output.emit(req, Failed(error))

    def _report(self) -> None:
        if self.metrics:
            with self._cond:
                queued = len(self._incoming) + len(self._waiting)
                waiting = [r.adapter_id for r in self._incoming] + [r.adapter_id for r in self._waiting]
            self.metrics.set_queue_depth(queued)
            self.metrics.set_running(len(self.batch))
            self.metrics.set_lora_requests((r.request.adapter_id for r in self.batch.all_rows), waiting,
                                           len(self.registry.slot_ranks()) - 1)


_CALL = {GENERATION: "Predict", SEQ_CLS: "Classify", TOKEN_CLS: "Tag", QA: "Answer"}


def _kind_mismatch(req: GenerationRequest, head: TaskHead | None) -> FailedPrecondition | None:
    """Why this request cannot run on its adapter's kind (generation on a head adapter or the reverse)."""
    have = head.spec.kind if head is not None else GENERATION
    if have == req.kind:
        return None
    if not req.adapter_id:
        return FailedPrecondition(f"{req.kind} needs an adapter of that kind; the base model has no task head")
    return FailedPrecondition(f"adapter {req.adapter_id!r} is a {have} adapter, not a {req.kind} one: "
                              f"call {_CALL[have]} with it")
