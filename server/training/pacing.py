"""A training job's side of the device turns: a share of device time while requests are served.

DeviceTurns alternates turns, one decode step against one training micro-batch. A micro-batch
(forward + backward over batch_size examples) takes far longer than a decode step, so alternation
alone gives serving a small share of the device time: decoding would crawl at the pace of training.
Here, while the engine has requests in flight, a job that just used the device for d seconds waits
d * (1 - share) / share before asking for its next turn, and the engine decodes meanwhile. With the
engine idle the job takes its turns back to back. So, with a job running:
- served tokens/s stay at about (1 - share) of what they are without one, or better;
- no gap between two tokens of a request exceeds one decode step plus one micro-batch.
"""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from typing import Callable


class SharedTurns:
    def __init__(self, turns, busy: Callable[[], bool], share: float, cancel: threading.Event):
        if not 0 < share <= 1:
            raise ValueError(f"a training share of device time must be in (0, 1], got {share}")
        self.turns = turns
        self.busy = busy
        self.share = share
        self.cancel = cancel
        self._owed = 0.0  # seconds of device time the engine may use before this job's next turn

    @contextmanager
    def turn(self):
        if self._owed > 0 and self.busy():
            # A timed wait, not a poll; a cancel ends it at once (the loop checks the flag next).
            self.cancel.wait(self._owed)
        with self.turns.turn():
            start = time.monotonic()
            try:
                yield
            finally:
                self._owed = (time.monotonic() - start) * (1 - self.share) / self.share
