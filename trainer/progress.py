"""A progress bar for `loraserve train` on stderr, drawn from the trainer's events.

On a terminal the bar redraws in place; in a log file (not a TTY) it writes a line about every 5%
of the steps instead, so logs stay readable.
"""

from __future__ import annotations

import sys
from typing import TextIO

from loraserve.trainer.events import Completed, Evaluation, Progress, Started

BAR_WIDTH = 24


def format_duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes:02d}:{secs:02d}"


def progress_line(p: Progress) -> str:
    filled = BAR_WIDTH * p.step // max(1, p.total_steps)
    bar = "#" * filled + "." * (BAR_WIDTH - filled)
    return (f"[{bar}] {p.step}/{p.total_steps} epoch {p.epoch:.2f}  loss {p.loss:.4f}  lr {p.learning_rate:.2e}  "
            f"{p.tokens_per_second:,.0f} tok/s  ETA {format_duration(p.eta_seconds)}")


class ProgressBar:
    """Callable as the trainer's on_event."""

    def __init__(self, stream: TextIO | None = None):
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.open_line = False  # a redrawn bar is on the current line
        self.every = 1

    def __call__(self, event) -> None:
        if isinstance(event, Started):
            self.every = max(1, event.total_steps // 20)
            note = f", {event.truncated} truncated to max_length" if event.truncated else ""
            self._line(f"training: {event.train_examples} examples ({event.eval_examples} held out for eval{note}), "
                       f"{event.total_steps} steps")
        elif isinstance(event, Progress):
            if self.tty:
                self.stream.write("\r" + progress_line(event) + "\x1b[K")
                self.stream.flush()
                self.open_line = True
            elif event.step % self.every == 0 or event.step == event.total_steps:
                self._line(progress_line(event))
        elif isinstance(event, Evaluation):
            if event.metrics:  # a task adapter: its metrics say more than a perplexity
                shown = ", ".join(f"{k} {v:.4f}" for k, v in event.metrics.items())
                self._line(f"step {event.step}: eval loss {event.eval_loss:.4f}, {shown}")
            else:
                self._line(f"step {event.step}: eval loss {event.eval_loss:.4f}, perplexity {event.perplexity:.2f}")
        elif isinstance(event, Completed):
            if self.open_line:
                self.stream.write("\n")
                self.open_line = False
            self.stream.flush()

    def _line(self, text: str) -> None:
        if self.open_line:
            self.stream.write("\n")
            self.open_line = False
        self.stream.write(text + "\n")
        self.stream.flush()
