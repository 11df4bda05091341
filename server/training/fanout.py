"""A job's events, fanned out from its training thread to any number of asyncio watchers.

The training thread publishes; each watcher (a Train or WatchTrainingJob stream, a waiting
CancelTrainingJob) owns an asyncio queue on its event loop, fed with loop.call_soon_threadsafe, so
the thread never blocks on a slow or departed client. A new watcher first gets the history, then
the live events, with nothing missed or repeated in between (both happen under one lock).

A job that stops with the server, to go on after a restart, has no last event: interrupt() ends
its watchers' streams with an error saying so instead.
"""

from __future__ import annotations

import asyncio
import threading
from typing import AsyncIterator

from loraserve.server.training.records import JobEvent, Queued
from loraserve.trainer.events import Progress


class EventLog:
    def __init__(self, history: list[JobEvent] | None = None):
        self._lock = threading.Lock()
        self._history: list[JobEvent] = list(history or [])
        self._watchers: set[tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = set()
        self._interrupted: Exception | None = None

    def publish(self, event: JobEvent) -> None:
        with self._lock:
            last = self._history[-1] if self._history else None
            # A replay needs the latest position and progress, not every step of a long job.
            if last is not None and type(last.kind) is type(event.kind) and isinstance(event.kind, (Progress, Queued)):
                self._history[-1] = event
            else:
                self._history.append(event)
            watchers = list(self._watchers)
            if event.last:
                self._watchers.clear()
        for loop, queue in watchers:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, event)
            except RuntimeError:  # that watcher's event loop is closed: nobody is listening there
                pass

    def interrupt(self, error: Exception) -> None:
        """End every stream, now and later, by raising `error` after the history."""
        with self._lock:
            self._interrupted = error
            watchers = list(self._watchers)
            self._watchers.clear()
        for loop, queue in watchers:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, error)
            except RuntimeError:
                pass

    async def follow(self) -> AsyncIterator[JobEvent]:
        """The history, then live events; ends after the job's last event, or raises the error of
        interrupt()."""
        queue: asyncio.Queue = asyncio.Queue()
        watcher = (asyncio.get_running_loop(), queue)
        with self._lock:
            for event in self._history:
                queue.put_nowait(event)
            if self._interrupted is not None:
                queue.put_nowait(self._interrupted)
            elif not (self._history and self._history[-1].last):
                self._watchers.add(watcher)
        try:
            while True:
                event = await queue.get()
                if isinstance(event, Exception):
                    raise event
                yield event
                if event.last:
                    return
        finally:
            with self._lock:
                self._watchers.discard(watcher)

    async def wait_ended(self) -> JobEvent:
        """The job's last event, once it has happened."""
        event = None
        async for event in self.follow():
            pass
        return event
