"""Fair turn-taking on the one device between the serving engine and training jobs.

The base model and the LoRA context are shared: exactly one forward (or forward+backward) runs at a
time. A ticket lock hands turns out in arrival order, so a training job cannot starve decoding and
decoding cannot starve training (a plain Lock gives no such promise).
"""

from __future__ import annotations

import threading
from contextlib import contextmanager


class DeviceTurns:
    def __init__(self):
        self._cond = threading.Condition()
        self._next_ticket = 0
        self._serving = 0

    @contextmanager
    def turn(self):
        with self._cond:
            ticket = self._next_ticket
            self._next_ticket += 1
            while ticket != self._serving:
                self._cond.wait()
        try:
            yield
        finally:
            with self._cond:
                self._serving += 1
                self._cond.notify_all()
