"""Training jobs: validated on submission, queued, trained on their own threads on the server's
one base model, recorded on disk, their events fanned out to watchers.

A running job calls trainer.loop.train_adapter with the server's base model, LoRA context and
wrapped layers (no second copy of the base weights) and the server's DeviceTurns: the engine and
every job take turns in arrival order, so while a job trains each decode step waits for at most
one training micro-batch per running job (a job's batch_size and max_length set its size). While
requests are in flight, jobs also keep to their share of device time (server.training.pacing).

A finished adapter is written into a hidden directory under the adapter root (".train-<job>",
never listed by the registry) and renamed into place by AdapterRegistry.install_dir, which drops
stale cached copies: the next Predict naming it loads the new files. A cancelled or failed job
removes its directory, so no half-written adapter is ever visible.

Records persist as JSON (server.training.store). Jobs survive restarts: a running job writes a
checkpoint every --checkpoint-every optimizer steps (server.training.jobfiles, trainer.checkpoint), a
Train request's inline examples are kept beside the record, and a drain (SIGTERM) suspends running
jobs with a last checkpoint and leaves queued ones queued; their streams end with UNAVAILABLE saying
so. On start, every job found queued or running (drained, or its server killed) queues again in its
original order and a running one resumes from its checkpoint, on the same data (checked by its
sha256): it ends with the adapter an uninterrupted run makes. A checkpoint that cannot be written
(a full disk) is logged and counted in the record, the previous one stays, and the job trains on.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import re
import shutil
import threading
import time
from pathlib import Path
from typing import Callable

import torch
from loraserve.core.errors import (
    AlreadyExists,
    Cancelled,
    FailedPrecondition,
    InvalidArgument,
    LoraserveError,
    NotFound,
    ResourceExhausted,
    Unavailable,
)
from loraserve.server.config import TrainingConfig
from loraserve.server.training.fanout import EventLog
from loraserve.server.training.jobfiles import JobFiles
from loraserve.server.training.pacing import SharedTurns
from loraserve.server.training.records import (
    CANCELLED,
    FAILED,
    FINISHED,
    QUEUED,
    RUNNING,
    STATES,
    SUCCEEDED,
    JobCancelled,
    JobCompleted,
    JobEvent,
    JobFailed,
    JobRecord,
    Outcome,
    Queued,
    new_job_id,
)
from loraserve.server.training.request import TrainRequest, ValidJob, validate
from loraserve.server.training.store import JobStore
from loraserve.trainer.checkpoint import Checkpointing, CheckpointUnreadable, TrainState
from loraserve.trainer.events import Completed, Progress, TrainMetrics
from loraserve.trainer.loop import Suspended, TrainingFailed, train_adapter
from loraserve.trainer.output import METADATA_FILE, write_adapter_files
from safetensors import SafetensorError

log = logging.getLogger(__name__)

JOBS_DIR = ".jobs"
TMP_PREFIX = ".train-"
JOB_ID_RE = re.compile(r"job-[0-9]{8}-[0-9]{9}-[0-9a-f]{6}")  # fullmatch: `$` also matches before a final "\n"
RESUME_FAILED = "could not resume after the server restarted"
NO_EXAMPLES = "its inline examples were not kept (it was submitted to an older server); submit it again"
_STATE_OF = {JobCompleted: SUCCEEDED, JobFailed: FAILED, JobCancelled: CANCELLED}


def check_job_id(job_id: str) -> str:
    if not JOB_ID_RE.fullmatch(job_id or ""):
        raise InvalidArgument(f"job id {job_id!r} is malformed: job ids look like job-20250101-120000123-0a1b2c")
    return job_id


class Job:
    """A job's live state. `record` is guarded by the manager's lock; read it through snapshots."""

    def __init__(self, record: JobRecord, events: EventLog, valid: ValidJob | None = None, resumes: bool = False):
        self.record = record
        self.events = events
        self.valid = valid
        """What to train on; dropped when the job ends, so a finished job holds no data set. None for a
        job recovered after a restart until it starts: then it is read and checked again."""
        self.resumes = resumes
        """Recovered after a restart, having started before it."""
        self.cancel = threading.Event()
        self.suspend = threading.Event()
        """Set with `cancel` by a shutdown: the job stops with a checkpoint, to resume after the restart."""
        self.stop_as: Outcome | None = None
        """How the job ends when `cancel` stops it without `suspend`: cancelled by a user."""
        self.thread: threading.Thread | None = None

    @property
    def job_id(self) -> str:
        return self.record.job_id


class TrainingJobs:
    def __init__(self, base, ctx, wrapped, registry, turns, metrics, config: TrainingConfig,
                 serving: Callable[[], bool] = lambda: False):
        """`serving` says whether the engine has requests in flight (then jobs keep to their share)."""
        self.base, self.ctx, self.wrapped = base, ctx, wrapped
        self.registry, self.turns, self.metrics, self.config = registry, turns, metrics, config
        self.serving = serving
        self.store = JobStore(config.jobs_dir or Path(registry.root) / JOBS_DIR)
        self.files = JobFiles(self.store.directory)
        self._lock = threading.Lock()
        self._jobs: dict[str, Job] = {}
        self._queue: collections.deque[Job] = collections.deque()
        self._running: dict[str, Job] = {}
        self._closed = False
        self._stopping = ""
        """The shutdown's reason, told to the streams of the jobs it suspends."""
        self._recover()

    # --- what the service calls ----------------------------------------------------------------

    def submit(self, request: TrainRequest) -> Job:
        """Validate (tokenizing the data: call from a worker thread) and queue; raises before any job exists."""
        with self._lock:
            self._check_room(request)  # refuse early what would be refused after the work below
        valid = validate(request, self.base, self.wrapped, self.registry, self.config)
        job_id = new_job_id()
        try:
            if request.examples is not None:  # what the job resumes on after a restart; written before the record
                self.files.save_examples(job_id, request.examples)
            with self._lock:
                self._check_room(request)  # again: another request may have taken the room meanwhile
                record = JobRecord(job_id=job_id, adapter_id=request.adapter_id, state=QUEUED, created_at=time.time(),
                                   settings=valid.settings.to_dict(), overwrite=request.overwrite,
                                   dataset_path=request.dataset_path, examples=valid.data.stats.examples,
                                   data_sha256=valid.data.data_hash, truncate=request.truncate,
                                   owner=request.owner)
                self.store.save(record)  # a job is accepted only once it is on disk
                job = Job(record, EventLog(), valid)
                self._jobs[job.job_id] = job
                self._queue.append(job)
                # Every stream opens with the job's place in the queue (and so its id), even if it starts now.
                record.queue_position = len(self._queue)
                job.events.publish(JobEvent(job.job_id, time.time(), Queued(record.queue_position)))
                self._start_ready()
                self._publish_positions()
        except BaseException:
            self.files.remove(job_id)
            raise
        log.info("training job %s accepted: adapter %s, %d examples", job.job_id, request.adapter_id, record.examples)
        return job

    def job(self, job_id: str) -> Job:
        with self._lock:
            return self._get(job_id)

    def snapshot(self, job: Job) -> JobRecord:
        with self._lock:
            return dataclasses.replace(job.record)

    def list(self, state: str | None = None, after: str = "", limit: int = 1000) -> tuple[list[JobRecord], bool]:
        """Records ordered by job id, those after `after`; and whether more follow."""
        if state is not None and state not in STATES:
            raise InvalidArgument(f"unknown job state {state!r}")
        with self._lock:
            ids = sorted(i for i, job in self._jobs.items()
                         if i > after and (state is None or job.record.state == state))
            return [dataclasses.replace(self._jobs[i].record) for i in ids[:limit]], len(ids) > limit

    def cancel(self, job_id: str, reason: str = "cancelled by CancelTrainingJob") -> Job:
        """Cancel now if queued; a running job stops at its next micro-batch (wait on job.events)."""
        with self._lock:
            job = self._get(job_id)
            state = job.record.state
            if state in (SUCCEEDED, FAILED):
                raise FailedPrecondition(f"job {job_id} already {state}: there is nothing to cancel")
            if self._closed and state != CANCELLED:
                # Its queue is gone and its thread is suspending it; after the restart it can be cancelled.
                raise Unavailable("the server is shutting down; cancel the job once it is back")
            if state == QUEUED:
                self._queue.remove(job)
                self._finish_locked(job, JobCancelled(reason))
                self._publish_positions()
            elif state == RUNNING and job.stop_as is None:
                job.stop_as = JobCancelled(reason)
                job.cancel.set()
        return job

    def shutdown(self, reason: str, timeout: float = 30.0) -> None:
        """Refuse new jobs and suspend the running ones (each writes a checkpoint of its last whole
        step at its next micro-batch); wait for their threads. Queued jobs stay queued on disk. The
        streams of both end with UNAVAILABLE: `reason` and when the job goes on."""
        with self._lock:
            self._closed, self._stopping = True, reason
            for job in self._queue:
                job.record.queue_position = 0
                job.events.interrupt(Unavailable(f"{reason}; job {job.job_id} stays queued and starts when the "
                                                 "server is back (WatchTrainingJob re-attaches)"))
            self._queue.clear()
            running = list(self._running.values())
            for job in running:
                if job.stop_as is None:  # a job being cancelled ends cancelled
                    job.suspend.set()
                job.cancel.set()  # also ends the job's wait for its share of the device
        deadline = time.monotonic() + timeout
        for job in running:
            job.thread.join(max(0.0, deadline - time.monotonic()))
            if job.thread.is_alive():
                log.warning("training job %s did not stop within %.0f s; after the restart it resumes from its "
                            "last checkpoint (step %d)", job.job_id, timeout, job.record.checkpoint_step)

    # --- the job threads ----------------------------------------------------------------------------

    def _run(self, job: Job) -> None:
        tmp = Path(self.registry.root) / f"{TMP_PREFIX}{job.job_id}"
        try:
            outcome = self._train(job, tmp)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)  # nothing is left there after a successful install
            job.valid = None
            if self.base.device.type == "cuda":
                torch.cuda.empty_cache()  # hand the job's activations and optimizer state back to serving
        with self._lock:
            self._running.pop(job.job_id, None)
            if outcome is None:
                self._suspended_locked(job)
            else:
                self._finish_locked(job, outcome)
            if not self._closed:
                self._start_ready()
                self._publish_positions()

    def _train(self, job: Job, tmp: Path) -> Outcome | None:
        """The job's outcome; None when a shutdown suspended it."""
        adapter_id = job.record.adapter_id
        try:
            if job.valid is None:  # recovered after a restart
                installed = self._installed_by(job.record)
                if installed is not None:
                    return installed
                job.valid = self._inputs(job.record)
            valid = job.valid
            checkpoints = Checkpointing(save=lambda state: self._save_checkpoint(job, state),
                                        every_steps=self.config.checkpoint_every_steps,
                                        resume=self._resume_point(job), suspend=job.suspend)
            turns = SharedTurns(self.turns, self.serving, self.config.training_share / self.config.max_concurrent_jobs,
                                job.cancel)
            result = train_adapter(self.base, self.ctx, self.wrapped, valid.settings, valid.data, turns=turns,
                                   cancel=job.cancel, on_event=lambda event: self._on_train_event(job, event),
                                   checkpoints=checkpoints)
            tmp.mkdir()
            write_adapter_files(tmp, result, valid.settings, self.base, adapter_id=adapter_id, task_id=job.job_id)
            if job.cancel.is_set():  # the last moment a cancel wins: once installed, the adapter is served
                raise Cancelled("cancelled before the adapter was registered")
            self.registry.install_dir(adapter_id, tmp, valid.request.overwrite)
        except Suspended:
            return None
        except Cancelled as e:
            return job.stop_as or JobCancelled(str(e))
        except TrainingFailed as e:
            return JobFailed(str(e))
        except (torch.OutOfMemoryError, MemoryError):
            return JobFailed("out of memory: lower batch_size or max_length, or set gradient_checkpointing")
        except LoraserveError as e:  # e.g. the adapter id was taken by an upload while the job trained
            return JobFailed(f"{RESUME_FAILED}: {e}" if job.valid is None else str(e))
        except (OSError, SafetensorError) as e:  # writing the adapter: a full disk; partial files go with `tmp`
            return JobFailed(f"the adapter could not be written ({getattr(e, 'strerror', None) or e}); "
                             "free space on the server and submit the job again")
        except Exception as e:  # noqa: BLE001 - a job's bug fails that job, never the server
            log.exception("training job %s failed", job.job_id)
            return JobFailed(f"internal error ({type(e).__name__}: {e}); this is a bug, please report it")
        if self.metrics is not None:
            self.metrics.training_tokens.inc(result.metrics.tokens)
        log.info("training job %s completed: adapter %s registered", job.job_id, adapter_id)
        return JobCompleted(adapter_id, result.metrics)

    # --- resuming -----------------------------------------------------------------------------------

    def _inputs(self, record: JobRecord) -> ValidJob:
        """A recovered job's data and settings, read and validated again as on submission; the data must
        be what the job was trained on so far."""
        examples = None
        if record.dataset_path is None:
            examples = self.files.load_examples(record.job_id)
            if examples is None:
                raise FailedPrecondition(NO_EXAMPLES)
        request = TrainRequest(record.adapter_id, dict(record.settings), examples, record.dataset_path,
                               record.overwrite, record.truncate, record.owner)
        valid = validate(request, self.base, self.wrapped, self.registry, self.config)
        if valid.data.data_hash != record.data_sha256:
            what = f"dataset_path {record.dataset_path!r}" if record.dataset_path else "its saved examples"
            raise FailedPrecondition(f"{what} changed since the job was submitted (sha256 differs); "
                                     "submit the job again")
        return valid

    def _resume_point(self, job: Job) -> TrainState | None:
        """The job's checkpoint (None: it starts at step 0); a recovered job's record says where it went on."""
        try:
            state = self.files.load_checkpoint(job.job_id)
        except CheckpointUnreadable as e:
            log.warning("training job %s: %s; it starts over", job.job_id, e)
            state = None
        if job.resumes:
            with self._lock:
                job.record.resumed_from_step = state.step if state is not None else 0
                self._save(job.record)
            log.info("training job %s resumes from step %d", job.job_id, job.record.resumed_from_step)
        return state

    def _save_checkpoint(self, job: Job, state: TrainState) -> None:
        """Called on the job's thread by the trainer; a write that fails keeps the previous checkpoint."""
        try:
            self.files.save_checkpoint(job.job_id, state)
        except OSError as e:
            log.warning("training job %s: checkpoint at step %d not written (%s); training goes on, its last "
                        "checkpoint is step %d", job.job_id, state.step, e.strerror or e, job.record.checkpoint_step)
            with self._lock:
                job.record.checkpoint_failures += 1
                self._save(job.record)
            self.metrics.checkpoint(written=False)
            return
        with self._lock:
            job.record.checkpoint_step = state.step
            self._save(job.record)
        self.metrics.checkpoint(written=True)

    def _installed_by(self, record: JobRecord) -> JobCompleted | None:
        """The job's adapter, if the server stopped after installing it but before the record said so."""
        try:
            info = json.loads((self.registry.path_of(record.adapter_id) / METADATA_FILE).read_text())
            if info["task_id"] != record.job_id:
                return None
            metrics = TrainMetrics(**info["metrics"])
        except (OSError, ValueError, TypeError, KeyError):
            return None
        log.info("training job %s had installed adapter %s before the restart", record.job_id, record.adapter_id)
        return JobCompleted(record.adapter_id, metrics)

    def _on_train_event(self, job: Job, event) -> None:
        if isinstance(event, Completed):
            return  # the job's own completion follows once the adapter is registered
        if isinstance(event, Progress):
            if self.metrics is not None:
                self.metrics.observe_training_step(event.loss)
            with self._lock:
                job.record.progress = event
        job.events.publish(JobEvent(job.job_id, time.time(), event))

    # --- bookkeeping (the lock held) ----------------------------------------------------------------

    def _get(self, job_id: str) -> Job:
        job = self._jobs.get(check_job_id(job_id))
        if job is None:
            raise NotFound(f"training job {job_id} not found")
        return job

    def _check_room(self, request: TrainRequest) -> None:
        if self._closed:
            raise Unavailable("the server is shutting down; submit the job to another replica")
        active = (*self._queue, *self._running.values())
        for job in active:
            if job.record.adapter_id == request.adapter_id:
                raise AlreadyExists(f"job {job.job_id} is already training adapter {request.adapter_id!r}; "
                                    "cancel it or wait for it to end")
        # One key may not fill the queue for every other key. Without keys every caller is the same one,
        # and max_queued_jobs alone bounds the queue.
        if request.owner is not None:
            cap = self.config.max_jobs_per_key
            mine = sum(1 for job in active if job.record.owner == request.owner)
            if mine >= cap:
                raise ResourceExhausted(f"API key {request.owner!r} has {mine} training jobs queued or running, "
                                        f"the most one key may have (--max-jobs-per-key {cap}); wait for one "
                                        "to end")
        if len(self._queue) >= self.config.max_queued_jobs:
            raise ResourceExhausted(f"the training queue is full ({self.config.max_queued_jobs} jobs waiting); "
                                    "retry later")

    def _start_ready(self) -> None:
        while self._queue and len(self._running) < self.config.max_concurrent_jobs:
            job = self._queue.popleft()
            record = job.record
            record.state, record.started_at, record.queue_position = RUNNING, record.started_at or time.time(), 0
            self._save(job.record)
            self._running[job.job_id] = job
            job.thread = threading.Thread(target=self._run, args=(job,), name=f"train-{job.job_id}", daemon=True)
            job.thread.start()
        self._report()

    def _publish_positions(self) -> None:
        for position, job in enumerate(self._queue, start=1):
            if job.record.queue_position != position:
                job.record.queue_position = position
                job.events.publish(JobEvent(job.job_id, time.time(), Queued(position)))

    def _finish_locked(self, job: Job, outcome: Outcome) -> None:
        record = job.record
        record.state, record.finished_at, record.queue_position = _STATE_OF[type(outcome)], time.time(), 0
        if isinstance(outcome, JobCompleted):
            record.metrics = outcome.metrics
        else:
            record.error = outcome.reason
        job.valid = None
        self._save(record)
        self.files.remove(job.job_id)  # its examples and checkpoint: a finished job never runs again
        self._report()
        job.events.publish(JobEvent(job.job_id, record.finished_at, outcome))
        log.info("training job %s %s%s", job.job_id, record.state, f": {record.error}" if record.error else "")

    def _suspended_locked(self, job: Job) -> None:
        """Stopped by a shutdown with a checkpoint: the record stays `running`, so the next start resumes it."""
        self._save(job.record)
        step = job.record.checkpoint_step
        job.events.interrupt(Unavailable(f"{self._stopping}; job {job.job_id} resumes from step {step} when the "
                                         "server is back (WatchTrainingJob re-attaches)"))
        log.info("training job %s suspended at step %d", job.job_id, step)

    def _save(self, record: JobRecord) -> None:
        try:
            self.store.save(record)
        except OSError as e:  # the job itself is fine; only its record may be stale after a restart
            log.error("cannot save training job record %s: %s", record.job_id, e)

    def _report(self) -> None:
        if self.metrics is None:
            return
        counts = collections.Counter(job.record.state for job in self._jobs.values())
        for state in STATES:
            self.metrics.training_jobs.labels(state).set(counts[state])

    def _recover(self) -> None:
        """Load the records of earlier runs. The jobs that were queued or running when their server
        stopped (drained or killed) queue again, oldest first as they were, and start now."""
        live = set()
        for record in self.store.load_all():
            shutil.rmtree(Path(self.registry.root) / f"{TMP_PREFIX}{record.job_id}", ignore_errors=True)
            history = []
            if record.progress is not None:
                history.append(JobEvent(record.job_id, record.started_at or record.created_at, record.progress))
            if record.state not in FINISHED and record.dataset_path is None and not self.files.has_examples(
                    record.job_id):
                record.state, record.error, record.finished_at = FAILED, f"{RESUME_FAILED}: {NO_EXAMPLES}", time.time()
                self._save(record)
            if record.state in FINISHED:
                history.append(JobEvent(record.job_id, record.finished_at, record.outcome()))
                self._jobs[record.job_id] = Job(record, EventLog(history))
                continue
            live.add(record.job_id)
            resumes = record.started_at is not None
            record.state, record.queue_position = QUEUED, 0
            job = Job(record, EventLog(history), resumes=resumes)
            self._jobs[record.job_id] = job
            self._queue.append(job)
        self.store.remove_temporaries()
        self.files.clean(live)
        with self._lock:
            if self._queue:
                log.info("%d training job(s) of the last run queue again: %s", len(self._queue),
                         ", ".join(job.job_id for job in self._queue))
            self._start_ready()
            self._publish_positions()
