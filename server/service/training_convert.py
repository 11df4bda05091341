"""Protobuf <-> training jobs: requests to server.training dataclasses, records and events to pb."""

from __future__ import annotations

from google.protobuf.timestamp_pb2 import Timestamp
from loraserve.core.errors import InvalidArgument
from loraserve.core.tasks.heads import GENERATION, QA, SEQ_CLS, TOKEN_CLS
from loraserve.server.training.records import (
    CANCELLED,
    FAILED,
    QUEUED,
    RUNNING,
    SUCCEEDED,
    JobCancelled,
    JobCompleted,
    JobEvent,
    JobFailed,
    JobRecord,
    Queued,
)
from loraserve.server.training.request import TrainRequest
from loraserve.trainer.events import Evaluation, Progress, Started, TrainMetrics
from loraserve.v1 import training_pb2 as pb

_SCHEDULERS = {pb.LR_SCHEDULER_LINEAR: "linear", pb.LR_SCHEDULER_COSINE: "cosine",
               pb.LR_SCHEDULER_CONSTANT: "constant"}
_TEMPLATES = {pb.PROMPT_TEMPLATE_AUTO: "auto", pb.PROMPT_TEMPLATE_CHAT: "chat", pb.PROMPT_TEMPLATE_PLAIN: "plain"}
_TASKS = {pb.TASK_KIND_GENERATION: GENERATION, pb.TASK_KIND_SEQUENCE_CLASSIFICATION: SEQ_CLS,
          pb.TASK_KIND_TOKEN_CLASSIFICATION: TOKEN_CLS, pb.TASK_KIND_QUESTION_ANSWERING: QA}
_ENUMS = {"lr_scheduler": (_SCHEDULERS, "LrScheduler"), "template": (_TEMPLATES, "PromptTemplate"),
          "task": (_TASKS, "TaskKind")}
_STATES = {QUEUED: pb.TRAINING_JOB_STATE_QUEUED, RUNNING: pb.TRAINING_JOB_STATE_RUNNING,
           SUCCEEDED: pb.TRAINING_JOB_STATE_SUCCEEDED, FAILED: pb.TRAINING_JOB_STATE_FAILED,
           CANCELLED: pb.TRAINING_JOB_STATE_CANCELLED}
_STATE_NAMES = {v: k for k, v in _STATES.items()}
# Settings whose proto field is a scalar of the same name and meaning as in TrainSettings.
_LISTS = ("target_modules", "labels")
_STRINGS = ("metric_for_best_model",)  # plain proto3 strings: empty means unset
_SCALARS = [f.name for f in pb.TrainingSettings.DESCRIPTOR.fields
            if f.name not in _ENUMS and f.name not in _LISTS and f.name not in _STRINGS]


def train_request_of(request: pb.TrainRequest) -> TrainRequest:
    return TrainRequest(
        adapter_id=request.adapter_id,
        settings=settings_of(request.settings),
        examples=[_example_of(e) for e in request.examples] or None,
        dataset_path=request.dataset_path or None,
        overwrite=request.overwrite,
        truncate=request.truncate,
    )


def settings_of(msg: pb.TrainingSettings) -> dict:
    """Only what the caller set: TrainSettings supplies defaults and checks every range."""
    out = {name: getattr(msg, name) for name in _SCALARS if msg.HasField(name)}
    for name in _LISTS:
        if getattr(msg, name):
            out[name] = list(getattr(msg, name))
    for name in _STRINGS:
        if getattr(msg, name):
            out[name] = getattr(msg, name)
    for name, (names, enum) in _ENUMS.items():
        value = getattr(msg, name)
        if value:
            if value not in names:
                raise InvalidArgument(f"{name} {value} is not a known {enum} value")
            out[name] = names[value]
    return out


def settings_pb(settings: dict) -> pb.TrainingSettings:
    """A record's resolved settings; a name this server does not know (an older record) is left out."""
    msg = pb.TrainingSettings(target_modules=settings.get("target_modules", ()), labels=settings.get("labels", ()),
                              metric_for_best_model=settings.get("metric_for_best_model", ""))
    for name in _SCALARS:
        if name in settings:
            setattr(msg, name, settings[name])
    for name, (names, _) in _ENUMS.items():
        if name in settings:
            setattr(msg, name, {v: k for k, v in names.items()}.get(settings[name], 0))
    return msg


def _example_of(example: pb.TrainingExample) -> dict:
    # Unset fields stay out of the object, so "missing field" is told apart from an empty one.
    out = {name: getattr(example, name) for name in ("prompt", "completion", "text", "label", "context", "question")
           if example.HasField(name)}
    if example.messages:
        out["messages"] = [{"role": m.role, "content": m.content} for m in example.messages]
    if example.labels or example.multi_label:
        out["labels"] = list(example.labels)
    if example.tokens or example.tags:
        out["tokens"], out["tags"] = list(example.tokens), list(example.tags)
    if example.entities:
        out["entities"] = [{"start": e.start, "end": e.end, "label": e.label} for e in example.entities]
        for entity, e in zip(out["entities"], example.entities):
            if e.HasField("text"):  # only a given text is checked against the span
                entity["text"] = e.text
    elif "text" in out and "label" not in out and "labels" not in out:
        out["entities"] = []  # a tagging example may have none
    if example.HasField("answers"):
        out["answers"] = {"text": list(example.answers.text), "answer_start": list(example.answers.answer_start)}
    return out


def state_of(state: int) -> str | None:
    """A ListTrainingJobs filter: None for every state."""
    if state == pb.TRAINING_JOB_STATE_UNSPECIFIED:
        return None
    if state not in _STATE_NAMES:
        raise InvalidArgument(f"state {state} is not a known TrainingJobState value")
    return _STATE_NAMES[state]


def _time(seconds: float) -> Timestamp:
    ts = Timestamp()
    ts.FromNanoseconds(int(seconds * 1e9))
    return ts


def progress_pb(p: Progress) -> pb.TrainingProgress:
    return pb.TrainingProgress(step=p.step, total_steps=p.total_steps, epoch=p.epoch, loss=p.loss,
                               learning_rate=p.learning_rate, tokens_per_second=p.tokens_per_second,
                               eta_seconds=p.eta_seconds)


def metrics_pb(m: TrainMetrics) -> pb.TrainingMetrics:
    msg = pb.TrainingMetrics(train_loss=m.train_loss, steps=m.steps, tokens=m.tokens, seconds=m.seconds,
                             tokens_per_second=m.tokens_per_second, stopped_early=m.stopped_early,
                             eval_metrics=m.eval_metrics)
    if m.eval_loss is not None:
        msg.eval_loss = m.eval_loss
    if m.perplexity is not None:
        msg.perplexity = m.perplexity
    return msg


def event_pb(event: JobEvent) -> pb.TrainingEvent:
    msg = pb.TrainingEvent(job_id=event.job_id, time=_time(event.time))
    kind = event.kind
    if isinstance(kind, Queued):
        msg.queued.position = kind.position
    elif isinstance(kind, Started):
        msg.started.CopyFrom(pb.TrainingEvent.Started(total_steps=kind.total_steps, train_examples=kind.train_examples,
                                                      eval_examples=kind.eval_examples,
                                                      truncated_examples=kind.truncated))
    elif isinstance(kind, Progress):
        msg.progress.CopyFrom(progress_pb(kind))
    elif isinstance(kind, Evaluation):
        msg.evaluation.CopyFrom(pb.TrainingEvaluation(step=kind.step, eval_loss=kind.eval_loss,
                                                      perplexity=kind.perplexity, metrics=kind.metrics))
    elif isinstance(kind, JobCompleted):
        msg.completed.CopyFrom(pb.TrainingEvent.Completed(adapter_id=kind.adapter_id, metrics=metrics_pb(kind.metrics)))
    elif isinstance(kind, JobFailed):
        msg.failed.reason = kind.reason
    elif isinstance(kind, JobCancelled):
        msg.cancelled.reason = kind.reason
    else:
        raise TypeError(f"no TrainingEvent for {type(kind).__name__}")
    return msg


def job_pb(r: JobRecord) -> pb.TrainingJob:
    msg = pb.TrainingJob(job_id=r.job_id, adapter_id=r.adapter_id, state=_STATES[r.state],
                         queue_position=r.queue_position, create_time=_time(r.created_at),
                         settings=settings_pb(r.settings), dataset_path=r.dataset_path or "", examples=r.examples,
                         data_sha256=r.data_sha256, error=r.error or "", overwrite=r.overwrite,
                         checkpoint_step=r.checkpoint_step, checkpoint_failures=r.checkpoint_failures,
                         resumed_from_step=r.resumed_from_step)
    if r.started_at is not None:
        msg.start_time.CopyFrom(_time(r.started_at))
    if r.finished_at is not None:
        msg.end_time.CopyFrom(_time(r.finished_at))
    if r.progress is not None:
        msg.progress.CopyFrom(progress_pb(r.progress))
    if r.metrics is not None:
        msg.metrics.CopyFrom(metrics_pb(r.metrics))
    return msg
