"""A training run's checkpoint: what it takes to continue the run exactly where it stopped.

One safetensors file holds the tensors (LoRA weights, AdamW state, the best weights kept for early
stopping, the dropout RNG state, the losses of the recent steps) and, in its metadata, a JSON
object with the rest (step, counters, evaluation tracking, and what identifies the run). One file,
so that one os.replace publishes it: a reader finds the previous checkpoint or the new one, never
half of one or a mix of two. Nothing is pickled: reading a checkpoint runs no code.
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import safetensors
import safetensors.torch
import torch
from loraserve.core.errors import FailedPrecondition

CHECKPOINT_FORMAT = 1
_METADATA_KEY = "loraserve_checkpoint"


@dataclass
class TrainState:
    """A run after `info["step"]` whole optimizer steps (trainer.loop builds and reads it)."""

    tensors: dict[str, torch.Tensor]
    info: dict
    """JSON-ready: step, counters, evaluation tracking, and the run's identity (settings, data, base)."""

    @property
    def step(self) -> int:
        return self.info["step"]


@dataclass
class Checkpointing:
    """How a run keeps checkpoints. `save` gets the state every `every_steps` optimizer steps (0: never
    on a schedule) and once more when `suspend` stops the run; it decides what a failed write means."""

    save: Callable[[TrainState], None]
    every_steps: int = 0
    resume: TrainState | None = None
    """Continue from this state instead of starting afresh."""
    suspend: threading.Event = field(default_factory=threading.Event)
    """Set (with the run's cancel event, which wakes its waits): stop at the next micro-batch, save the
    state of the last whole step, and raise Suspended."""


class CheckpointUnreadable(FailedPrecondition):
    """The file is not a checkpoint this version can read (damaged, or from an unknown format)."""


def save_checkpoint(path: str | Path, state: TrainState) -> None:
    """Write atomically; on any error (ENOSPC, EFBIG...) the previous checkpoint at `path` stays intact."""
    metadata = {_METADATA_KEY: json.dumps({"format": CHECKPOINT_FORMAT, **state.info}, allow_nan=False)}
    data = safetensors.torch.save({k: v.detach().cpu().contiguous() for k, v in state.tensors.items()}, metadata)
    write_atomic(Path(path), data)


def load_checkpoint(path: str | Path) -> TrainState | None:
    """The checkpoint at `path`; None when there is none."""
    path = Path(path)
    try:
        with safetensors.safe_open(path, framework="pt") as f:
            info = json.loads((f.metadata() or {})[_METADATA_KEY])
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, safetensors.SafetensorError) as e:
        raise CheckpointUnreadable(f"checkpoint {path.name} is unreadable: {e}") from None
    if not isinstance(info, dict) or info.get("format") != CHECKPOINT_FORMAT or not isinstance(info.get("step"), int):
        raise CheckpointUnreadable(f"checkpoint {path.name} has an unknown format")
    del info["format"]
    return TrainState(tensors, info)


def write_atomic(path: Path, data: bytes) -> None:
    """The bytes in a temporary file beside `path`, flushed to disk, then renamed over it, and the
    rename flushed too (the directory): after a crash or power cut, the old file or the new one."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
