"""Detokenizing and event delivery, off the engine thread.

Turning token ids into text (incremental decode, stop sequences) costs tens of microseconds per row
per step: at batch 64 that is milliseconds, as long as the GPU step itself. The engine thread hands
each step's tokens here and goes on stepping; this thread decodes and emits. Every event of a
request goes through the one queue, so a request sees its deltas, then its end, in order.

A stop sequence is found here, a step or two after its last token was decoded: the row is then
finished by the engine at its next step (like a cancel), and the tokens generated meanwhile are
dropped with the text after the stop.
"""

from __future__ import annotations

import logging
import queue
import threading
from typing import Callable

import torch
from loraserve.server.engine.row import Row
from loraserve.server.engine.types import (
    Event,
    Finished,
    GenerationRequest,
    TextDelta,
    Timings,
)

log = logging.getLogger(__name__)

_STOP = object()


class Output:
    def __init__(self, on_stop_text: Callable[[str], None]):
        self.on_stop_text = on_stop_text  # request id whose text hit a stop sequence
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="engine-output", daemon=True)
        self._idle = threading.Condition()
        self._pending = 0

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Deliver everything queued so far, then end the thread."""
        if self._thread.is_alive():
            self._queue.put(_STOP)
            self._thread.join(timeout=30)

    def wait_delivered(self, timeout: float) -> bool:
        with self._idle:
            return self._idle.wait_for(lambda: self._pending == 0, timeout=timeout)

    # --- called from the engine thread ---------------------------------------------------------

    def tokens(self, out: list[tuple[Row, int]]) -> None:
        if out:
            self._put(("tokens", out))

    def finish(self, row: Row, timings: Timings) -> None:
        self._put(("finish", row, row.finish_reason, row.generated, timings))

    def emit(self, request: GenerationRequest, event: Event) -> None:
        self._put(("emit", request, event))

    def _put(self, item) -> None:
        with self._idle:
            self._pending += 1
        self._queue.put(item)

    # --- this thread ---------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            try:
                self._handle(item)
            except Exception:  # noqa: BLE001 - a broken callback must not stop delivery for others
                log.exception("delivering an engine event failed")
            finally:
                with self._idle:
                    self._pending -= 1
                    if self._pending == 0:
                        self._idle.notify_all()

    def _handle(self, item) -> None:
        kind = item[0]
        if kind == "tokens":
            for row, token in item[1]:
                stream = row.stream
                if stream.stopped:
                    continue  # generated after a stop sequence; the engine finishes the row shortly
                delta = stream.add(token)
                if delta:
                    row.request.emit(TextDelta(delta, len(stream.ids)))
                if stream.stopped:
                    self.on_stop_text(row.request.request_id)
        elif kind == "finish":
            _, row, reason, generated, timings = item
            stream, req = row.stream, row.request
            if stream.stopped:  # the text hit a stop sequence: that is the end, whatever came after
                reason, generated = "stop", len(stream.ids)
            tail = stream.finish() if reason in ("stop", "length") else ""
            if tail:
                req.emit(TextDelta(tail, generated))
            head = row.head
            logits = torch.cat(row.head_logits).cpu() if head is not None and reason == "stop" else None
            req.emit(Finished(reason, stream.text, len(req.prompt_ids), generated, timings, logits,
                              head.spec if head is not None else None))
        else:
            _, request, event = item
            request.emit(event)
