"""A Train request as plain data, and its validation: everything that can be refused is refused
here, before a job exists or the device is touched.

Order: the cheap checks first (adapter id, settings against this server's limits), then the data
(read, parsed and tokenized once; the job trains on exactly what was checked).
"""

from __future__ import annotations

import math

from dataclasses import dataclass
from pathlib import Path

from loraserve.core.errors import AlreadyExists, InvalidArgument, NotFound
from loraserve.core.lora.ids import check_id
from loraserve.server.config import TrainingConfig
from loraserve.trainer.data import PreparedData, parse_records, prepare, read_jsonl
from loraserve.trainer.loop import select_modules
from loraserve.trainer.settings import TrainSettings

TRUNCATED_NAMED = 5  # examples named in the refusal; the rest are counted


@dataclass(frozen=True)
class TrainRequest:
    adapter_id: str
    settings: dict
    """Only the settings the caller set; TrainSettings fills in the rest."""
    examples: list[dict] | None = None
    """Inline examples as JSON-like objects ({"prompt", "completion"} or {"messages"})."""
    dataset_path: str | None = None
    """A JSONL file under the data root."""
    overwrite: bool = False
    truncate: bool = False
    """Cut examples longer than max_length instead of refusing them."""
    owner: str | None = None
    """Name of the API key that submitted the job (None when the server runs without keys)."""


@dataclass(frozen=True)
class ValidJob:
    request: TrainRequest
    settings: TrainSettings
    data: PreparedData


def validate(request: TrainRequest, base, wrapped, registry, config: TrainingConfig) -> ValidJob:
    """Raises InvalidArgument / NotFound / AlreadyExists with what to change."""
    adapter_id = check_id(request.adapter_id)
    registry.path_of(adapter_id)  # containment under the adapter root
    if registry.exists(adapter_id) and not request.overwrite:
        raise AlreadyExists(f"adapter {adapter_id!r} already exists: choose another id or set overwrite")
    settings = TrainSettings.from_dict(request.settings)
    if settings.rank > registry.max_rank:
        raise InvalidArgument(f"rank must be in [1, {registry.max_rank}] (the server's --max-lora-rank), "
                              f"got {settings.rank}")
    if settings.max_length > base.context_window:
        raise InvalidArgument(f"max_length must be in [8, {base.context_window}] (the model's context window), "
                              f"got {settings.max_length}")
    select_modules(wrapped, settings.target_modules)  # every target must name a layer of this model
    examples = _examples(request, config, settings.task)
    data = prepare(examples, base.tokenizer, settings, base.eos_token_ids)
    _check_budget(settings, data, config)
    if data.stats.truncated and not request.truncate:
        long = [t.source for t in data.train + data.eval if t.truncated]
        named = ", ".join(sorted(long, key=_source_order)[:TRUNCATED_NAMED])
        more = f" and {len(long) - TRUNCATED_NAMED} more" if len(long) > TRUNCATED_NAMED else ""
        raise InvalidArgument(f"{named}{more}: longer than max_length={settings.max_length} tokens; shorten them, "
                              f"raise max_length (up to {base.context_window}), or set truncate to cut them")
    return ValidJob(request, settings, data)


def _check_budget(settings: TrainSettings, data: PreparedData, config: TrainingConfig) -> None:
    """A job's planned work is bounded before it is queued: a request cannot book the device for days."""
    per_step = settings.batch_size * settings.gradient_accumulation_steps
    steps = settings.max_steps or settings.epochs * math.ceil(math.ceil(len(data.train) / settings.batch_size)
                                                              / settings.gradient_accumulation_steps)
    if steps > config.max_steps_per_job:
        raise InvalidArgument(f"the job plans {steps} optimizer steps; the server's --max-train-steps is "
                              f"{config.max_steps_per_job}")
    mean = math.ceil(data.stats.tokens / max(1, data.stats.examples))
    tokens = steps * per_step * mean
    if tokens > config.max_tokens_per_job:
        raise InvalidArgument(f"the job plans about {tokens} training tokens ({steps} steps x {per_step} examples x "
                              f"{mean} tokens); the server's --max-train-tokens is {config.max_tokens_per_job}")


def _examples(request: TrainRequest, config: TrainingConfig, kind: str):
    if request.examples and request.dataset_path:
        raise InvalidArgument("give either examples or dataset_path, not both")
    if request.dataset_path:
        path = resolve_dataset(request.dataset_path, config.data_root)
        try:
            is_file = path.is_file()
        except OSError as e:  # a name too long, a directory it may not enter: not a file it can read
            raise InvalidArgument(f"dataset_path {request.dataset_path!r} cannot be resolved "
                                  f"({e.strerror or type(e).__name__})") from None
        if not is_file:
            # Said here with the caller's own path: the server's directory layout stays private.
            raise NotFound(f"dataset_path {request.dataset_path!r} names no file under the server's data root")
        return read_jsonl(path, config.max_examples, kind)
    if not request.examples:
        raise InvalidArgument("the data set is empty: give examples, or a dataset_path under the server's data root")
    return parse_records(request.examples, config.max_examples, kind)


def resolve_dataset(path: str, data_root: str) -> Path:
    """The file under the data root; a path escaping it (.., absolute, symlink) is refused."""
    root = Path(data_root).expanduser().resolve()
    if "\x00" in path:
        raise InvalidArgument("dataset_path must not contain NUL characters")
    try:
        resolved = (root / path).resolve()
    except (OSError, RuntimeError) as e:  # a symlink loop: RuntimeError before Python 3.13, its text the full path
        why = getattr(e, "strerror", None) or "a symlink loop"
        raise InvalidArgument(f"dataset_path {path!r} cannot be resolved ({why})") from None
    if not resolved.is_relative_to(root):
        raise InvalidArgument(f"dataset_path {path!r} lies outside the server's data root; give a path relative to it")
    return resolved


def _source_order(source: str) -> int:
    # "example 12" / "line 12": order by number, as the user counts them.
    return int(source.rpartition(" ")[2])
