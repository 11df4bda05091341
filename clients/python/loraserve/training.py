"""Typed training jobs and events for the Python client (see Client.train and friends).

Settings are a plain dict of TrainSettings names, e.g. {"rank": 8, "learning_rate": 1e-3,
"lr_scheduler": "cosine", "target_modules": ["q_proj", "v_proj"]}; unset names take the server's
defaults.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

from loraserve.v1 import inference_pb2
from loraserve.v1 import training_pb2 as pb

STATES = {pb.TRAINING_JOB_STATE_QUEUED: "queued", pb.TRAINING_JOB_STATE_RUNNING: "running",
          pb.TRAINING_JOB_STATE_SUCCEEDED: "succeeded", pb.TRAINING_JOB_STATE_FAILED: "failed",
          pb.TRAINING_JOB_STATE_CANCELLED: "cancelled"}
_ENUMS = {
    "lr_scheduler": {"linear": pb.LR_SCHEDULER_LINEAR, "cosine": pb.LR_SCHEDULER_COSINE,
                     "constant": pb.LR_SCHEDULER_CONSTANT},
    "template": {"auto": pb.PROMPT_TEMPLATE_AUTO, "chat": pb.PROMPT_TEMPLATE_CHAT, "plain": pb.PROMPT_TEMPLATE_PLAIN},
    "task": {"generation": pb.TASK_KIND_GENERATION, "seq_cls": pb.TASK_KIND_SEQUENCE_CLASSIFICATION,
             "token_cls": pb.TASK_KIND_TOKEN_CLASSIFICATION, "qa": pb.TASK_KIND_QUESTION_ANSWERING},
}
_LISTS = ("target_modules", "labels")
_STRINGS = ("metric_for_best_model",)


@dataclass(frozen=True)
class Queued:
    position: int
    """1 starts next."""


@dataclass(frozen=True)
class Started:
    total_steps: int
    train_examples: int
    eval_examples: int
    truncated_examples: int


@dataclass(frozen=True)
class Progress:
    step: int
    total_steps: int
    epoch: float
    loss: float
    learning_rate: float
    tokens_per_second: float
    eta_seconds: float


@dataclass(frozen=True)
class Evaluation:
    step: int
    eval_loss: float
    perplexity: float
    metrics: dict[str, float]
    """Task adapters: accuracy, macro_f1, entity_f1, exact_match, ... on the held-out split."""


@dataclass(frozen=True)
class Metrics:
    train_loss: float
    eval_loss: float | None
    perplexity: float | None
    steps: int
    tokens: int
    seconds: float
    tokens_per_second: float
    stopped_early: bool
    eval_metrics: dict[str, float]
    """Task adapters: the kept adapter's evaluation metrics."""


@dataclass(frozen=True)
class Completed:
    adapter_id: str
    metrics: Metrics


@dataclass(frozen=True)
class Failed:
    reason: str


@dataclass(frozen=True)
class Cancelled:
    reason: str


@dataclass(frozen=True)
class TrainingEvent:
    job_id: str
    time: float
    """Unix time."""
    kind: Queued | Started | Progress | Evaluation | Completed | Failed | Cancelled

    @property
    def last(self) -> bool:
        return isinstance(self.kind, (Completed, Failed, Cancelled))


@dataclass(frozen=True)
class TrainingJob:
    job_id: str
    adapter_id: str
    state: str
    """queued, running, succeeded, failed or cancelled."""
    queue_position: int
    created_at: float
    started_at: float | None
    finished_at: float | None
    settings: dict
    dataset_path: str
    examples: int
    data_sha256: str
    progress: Progress | None
    metrics: Metrics | None
    error: str
    overwrite: bool
    checkpoint_step: int = 0
    """The step the latest checkpoint holds (0: none); a server restart resumes the job from there."""
    checkpoint_failures: int = 0
    resumed_from_step: int | None = None
    """Set when the job went on after a server restart: the step it resumed from."""


def settings_pb(settings: dict | None) -> pb.TrainingSettings:
    msg = pb.TrainingSettings()
    for name, value in (settings or {}).items():
        if name not in pb.TrainingSettings.DESCRIPTOR.fields_by_name:
            raise ValueError(f"unknown training setting {name!r}")
        if name in _LISTS:
            getattr(msg, name).extend([value] if isinstance(value, str) else value)
        elif name in _ENUMS:
            if value not in _ENUMS[name]:
                raise ValueError(f"{name} must be one of {', '.join(_ENUMS[name])}, got {value!r}")
            setattr(msg, name, _ENUMS[name][value])
        else:
            setattr(msg, name, value)
    return msg


def settings_dict(msg: pb.TrainingSettings) -> dict:
    out = {}
    for field in msg.DESCRIPTOR.fields:
        value = getattr(msg, field.name)
        if field.name in _ENUMS:
            out[field.name] = {v: k for k, v in _ENUMS[field.name].items()}.get(value)
        elif field.name in _LISTS:
            out[field.name] = list(value)
        elif field.name in _STRINGS:
            out[field.name] = value
        elif msg.HasField(field.name):
            out[field.name] = value
    return out


def example_pb(example: dict, names: list[str] | None = None) -> pb.TrainingExample:
    """An example in its task's JSONL form: {"prompt", "completion"} or {"messages": [{"role", "content"}]};
    {"text", "label"} or {"text", "labels"}; {"tokens", "tags" (or "ner_tags")} or {"text", "entities"};
    SQuAD's {"context", "question", "answers": {"text", "answer_start"}}. Other keys are ignored.
    Integer class ids (Hugging Face datasets' form) become the names at their index when the label
    names are given (the `labels` setting), as the server reads them in a JSONL file; else a label's
    digits (integer tags without names are a ValueError: a tag must be a BIO name)."""
    msg = pb.TrainingExample(**{k: example[k] for k in ("prompt", "completion", "text", "context", "question")
                                if k in example})
    if "label" in example:
        msg.label = _class_name(example["label"], names)
    msg.messages.extend(inference_pb2.ChatMessage(role=m["role"], content=m["content"])
                        for m in example.get("messages", ()))
    if "labels" in example:
        msg.labels.extend(_class_name(x, names) for x in example["labels"])
        msg.multi_label = True
    msg.tokens.extend(example.get("tokens", ()))
    tags = example.get("tags", example.get("ner_tags", ()))
    if not names and any(isinstance(t, int) and not isinstance(t, bool) for t in tags):
        raise ValueError("integer tags need the labels setting (the tag names by index, as the data set's "
                         "features list them)")
    msg.tags.extend(_class_name(x, names) for x in tags)
    msg.entities.extend(pb.EntitySpan(start=e["start"], end=e["end"], label=e["label"], text=e.get("text"))
                        for e in example.get("entities", ()))
    if "answers" in example:
        msg.answers.text.extend(example["answers"]["text"])
        msg.answers.answer_start.extend(example["answers"]["answer_start"])
    return msg


def _class_name(value, names: list[str] | None) -> str:
    if isinstance(value, int) and not isinstance(value, bool) and names and 0 <= value < len(names):
        return names[value]
    return str(value)


def train_request(adapter_id: str, examples: Iterable[dict] | None, dataset_path: str | None, settings: dict | None,
                  overwrite: bool, truncate: bool) -> pb.TrainRequest:
    names = (settings or {}).get("labels")
    names = [x.strip() for x in names.split(",") if x.strip()] if isinstance(names, str) else names
    return pb.TrainRequest(adapter_id=adapter_id, examples=[example_pb(e, names) for e in examples or ()],
                           dataset_path=dataset_path or "", settings=settings_pb(settings), overwrite=overwrite,
                           truncate=truncate)


def progress_of(msg: pb.TrainingProgress) -> Progress:
    return Progress(msg.step, msg.total_steps, msg.epoch, msg.loss, msg.learning_rate, msg.tokens_per_second,
                    msg.eta_seconds)


def metrics_of(msg: pb.TrainingMetrics) -> Metrics:
    return Metrics(msg.train_loss, msg.eval_loss if msg.HasField("eval_loss") else None,
                   msg.perplexity if msg.HasField("perplexity") else None, msg.steps, msg.tokens, msg.seconds,
                   msg.tokens_per_second, msg.stopped_early, dict(msg.eval_metrics))


def event_of(msg: pb.TrainingEvent) -> TrainingEvent:
    which = msg.WhichOneof("kind")
    body = getattr(msg, which) if which else None
    if which == "queued":
        kind = Queued(body.position)
    elif which == "started":
        kind = Started(body.total_steps, body.train_examples, body.eval_examples, body.truncated_examples)
    elif which == "progress":
        kind = progress_of(body)
    elif which == "evaluation":
        kind = Evaluation(body.step, body.eval_loss, body.perplexity, dict(body.metrics))
    elif which == "completed":
        kind = Completed(body.adapter_id, metrics_of(body.metrics))
    elif which == "failed":
        kind = Failed(body.reason)
    elif which == "cancelled":
        kind = Cancelled(body.reason)
    else:
        raise ValueError(f"training event of unknown kind {which!r} (is this client older than the server?)")
    return TrainingEvent(msg.job_id, msg.time.ToNanoseconds() / 1e9, kind)


def _time(msg, name: str) -> float | None:
    return getattr(msg, name).ToNanoseconds() / 1e9 if msg.HasField(name) else None


def job_of(msg: pb.TrainingJob) -> TrainingJob:
    return TrainingJob(
        job_id=msg.job_id, adapter_id=msg.adapter_id, state=STATES.get(msg.state, "unknown"),
        queue_position=msg.queue_position, created_at=_time(msg, "create_time"),
        started_at=_time(msg, "start_time"), finished_at=_time(msg, "end_time"), settings=settings_dict(msg.settings),
        dataset_path=msg.dataset_path, examples=msg.examples, data_sha256=msg.data_sha256,
        progress=progress_of(msg.progress) if msg.HasField("progress") else None,
        metrics=metrics_of(msg.metrics) if msg.HasField("metrics") else None, error=msg.error,
        overwrite=msg.overwrite, checkpoint_step=msg.checkpoint_step, checkpoint_failures=msg.checkpoint_failures,
        resumed_from_step=msg.resumed_from_step if msg.HasField("resumed_from_step") else None)
