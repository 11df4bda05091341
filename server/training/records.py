"""A training job's record (what persists) and the events it emits beyond the trainer's own.

The record is plain data, written as JSON by the store; the live parts of a job (its data set, its
cancel flag, its watchers) live in server.training.jobs and are never persisted.

Format 1 grew fields over time, each with a default: a record written before a field existed reads
with the default, and a server that predates a field ignores it.
"""

from __future__ import annotations

import math
import secrets
import time
from dataclasses import asdict, dataclass, field, fields

from loraserve.trainer.events import Evaluation, Progress, Started, TrainMetrics

QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED = "queued", "running", "succeeded", "failed", "cancelled"
STATES = (QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED)
FINISHED = frozenset({SUCCEEDED, FAILED, CANCELLED})
RECORD_FORMAT = 1


def new_job_id() -> str:
    """Creation time first (UTC, to the millisecond) so that ids sort by age; a random tail keeps
    two ids of the same millisecond apart."""
    now = time.time()
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime(now))
    return f"job-{stamp}{int(now * 1000) % 1000:03d}-{secrets.token_hex(3)}"


@dataclass(frozen=True)
class Queued:
    position: int
    """1 starts next."""


@dataclass(frozen=True)
class JobCompleted:
    adapter_id: str
    metrics: TrainMetrics


@dataclass(frozen=True)
class JobFailed:
    reason: str


@dataclass(frozen=True)
class JobCancelled:
    reason: str


Outcome = JobCompleted | JobFailed | JobCancelled
Kind = Queued | Started | Progress | Evaluation | Outcome


@dataclass(frozen=True)
class JobEvent:
    job_id: str
    time: float
    """Unix time."""
    kind: Kind

    @property
    def last(self) -> bool:
        return isinstance(self.kind, (JobCompleted, JobFailed, JobCancelled))


@dataclass
class JobRecord:
    job_id: str
    adapter_id: str
    state: str
    created_at: float
    settings: dict
    """TrainSettings.to_dict(): every setting resolved."""
    overwrite: bool
    dataset_path: str | None
    """The request's path under the data root; None for inline examples."""
    examples: int
    data_sha256: str
    truncate: bool = False
    """The request's truncate, to validate the data again when the job resumes after a restart."""
    owner: str | None = None
    """The API key (by name) that submitted the job; the per-key job cap counts by it."""
    started_at: float | None = None
    finished_at: float | None = None
    progress: Progress | None = None
    metrics: TrainMetrics | None = None
    error: str | None = None
    checkpoint_step: int = 0
    """Optimizer steps the job's latest checkpoint holds; 0: none."""
    checkpoint_failures: int = 0
    """Checkpoints that could not be written (a full disk); the job trained on, keeping the previous one."""
    resumed_from_step: int | None = None
    """Set when the job resumed after a server restart: the step it went on from (0: it started over)."""
    queue_position: int = field(default=0, compare=False)
    """Live only (recomputed as the queue moves); not persisted."""

    def to_json(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "queue_position"}
        out["progress"] = _finite(asdict(self.progress)) if self.progress else None
        out["metrics"] = _finite(self.metrics.to_dict()) if self.metrics else None
        return {"format": RECORD_FORMAT, **out}

    @classmethod
    def from_json(cls, data: dict) -> "JobRecord":
        if data.get("format") != RECORD_FORMAT:
            raise ValueError(f"unknown job record format {data.get('format')!r}")
        values = {f.name: data[f.name] for f in fields(cls) if f.name in data}
        if values.get("state") not in STATES:
            raise ValueError(f"unknown job state {values.get('state')!r}")
        if values.get("progress"):
            values["progress"] = Progress(**_restore(values["progress"]))
        if values.get("metrics"):
            values["metrics"] = TrainMetrics(**_restore(values["metrics"]))
        return cls(**values)

    def outcome(self) -> Outcome | None:
        """The final event of a finished job, rebuilt from the record (for jobs of an earlier run)."""
        if self.state == SUCCEEDED:
            return JobCompleted(self.adapter_id, self.metrics)
        if self.state == FAILED:
            return JobFailed(self.error or "failed")
        if self.state == CANCELLED:
            return JobCancelled(self.error or "cancelled")
        return None


# Strict JSON has no Infinity or NaN (a perplexity overflows to inf): stored as strings, read back.
def _finite(values: dict) -> dict:
    return {k: (repr(v) if isinstance(v, float) and not math.isfinite(v) else v) for k, v in values.items()}


def _restore(values: dict) -> dict:
    return {k: (float(v) if v in ("inf", "-inf", "nan") else v) for k, v in values.items()}
