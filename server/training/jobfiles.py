"""What a job keeps on disk, beside its record, while it may still run: the inline examples it trains
on and its latest checkpoint, in <jobs dir>/<job id>/. With them a job outlives the server: after a
restart it resumes from the checkpoint on the same data. A finished job's directory is removed.

Every file is written atomically (trainer.checkpoint.write_atomic): a crash or a full disk leaves the
previous version or nothing, never half a file.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from loraserve.trainer.checkpoint import TrainState, load_checkpoint, save_checkpoint, write_atomic

log = logging.getLogger(__name__)

EXAMPLES = "examples.jsonl"
CHECKPOINT = "checkpoint.safetensors"


class JobFiles:
    def __init__(self, jobs_dir: Path):
        self.jobs_dir = jobs_dir

    def directory(self, job_id: str) -> Path:
        return self.jobs_dir / job_id

    def save_examples(self, job_id: str, examples: list[dict]) -> None:
        """A Train request's inline examples as given (validated), one JSON object a line."""
        data = "".join(json.dumps(e, ensure_ascii=False, separators=(",", ":")) + "\n" for e in examples)
        self._make(job_id)
        write_atomic(self.directory(job_id) / EXAMPLES, data.encode())

    def has_examples(self, job_id: str) -> bool:
        return (self.directory(job_id) / EXAMPLES).is_file()

    def load_examples(self, job_id: str) -> list[dict] | None:
        """The examples saved at submission; None when there are none (a job from an older server)."""
        try:
            text = (self.directory(job_id) / EXAMPLES).read_text()
        except FileNotFoundError:
            return None
        return [json.loads(line) for line in text.splitlines()]

    def save_checkpoint(self, job_id: str, state: TrainState) -> None:
        self._make(job_id)
        save_checkpoint(self.directory(job_id) / CHECKPOINT, state)

    def load_checkpoint(self, job_id: str) -> TrainState | None:
        """Raises CheckpointUnreadable for a damaged one."""
        return load_checkpoint(self.directory(job_id) / CHECKPOINT)

    def remove(self, job_id: str) -> None:
        shutil.rmtree(self.directory(job_id), ignore_errors=True)

    def clean(self, live: set[str]) -> None:
        """After a restart: remove the directories of jobs that are over (or were never accepted: the
        examples are written before the record) and writes a crash cut short in the others."""
        if not self.jobs_dir.is_dir():
            return
        for path in self.jobs_dir.iterdir():
            if not path.is_dir() or path.is_symlink():
                continue
            if path.name not in live:
                shutil.rmtree(path, ignore_errors=True)
                continue
            for tmp in path.glob(".*.tmp"):
                log.info("removing %s, a write cut short", tmp)
                tmp.unlink(missing_ok=True)

    def _make(self, job_id: str) -> None:
        self.directory(job_id).mkdir(parents=True, exist_ok=True)
