"""Training data: JSONL files or inline examples, validated, hashed, split and batched.

Each example is {"prompt": str, "completion": str} or {"messages": [{"role": str, "content": str}, ...]};
other keys are ignored (data sets often carry ids). Every problem is an InvalidArgument naming the
line ("line N", 1-based, blank lines counted) or the inline example ("example N", 1-based).
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from loraserve.core.errors import InvalidArgument, NotFound
from loraserve.core.prompt import ROLES
from loraserve.core.tasks.heads import GENERATION, QA
from loraserve.trainer.render import (
    IGNORE,
    Example,
    Tokenized,
    tokenize_example,
    use_chat,
)
from loraserve.trainer.settings import TrainSettings
from loraserve.trainer.task_data import (
    TaskExample,
    TaskTokenized,
    label_set,
    parse_task_record,
    resolve_class_ids,
    tokenize_task,
)

_JSON_TYPES = {dict: "an object", list: "an array", str: "a string", int: "a number", float: "a number",
               bool: "a boolean", type(None): "null"}


@dataclass(frozen=True)
class DataStats:
    examples: int
    train_examples: int
    eval_examples: int
    truncated: int
    """Examples cut to max_length (their completion's end is not learned); reported, never silent."""
    tokens: int
    """Tokens in all examples after truncation."""
    completion_tokens: int
    """Of those, the ones the loss is computed on."""


@dataclass(frozen=True)
class TaskLabels:
    """A task kind's label set, resolved from the settings and the data."""

    labels: tuple[str, ...]
    multi_label: bool = False


@dataclass(frozen=True)
class PreparedData:
    train: list[Tokenized] | list[TaskTokenized]
    eval: list[Tokenized] | list[TaskTokenized]
    stats: DataStats
    data_hash: str
    """sha256 of the canonical examples in order; recorded with the adapter it trained."""
    task: TaskLabels | None = None
    """Set for the task kinds beside generation."""
    eval_examples: list[TaskExample] | None = None
    """Task kinds: the held-out examples themselves (answers, tags) for the evaluation's metrics;
    TaskTokenized.example indexes this list for eval items."""


def read_jsonl(path: str | Path, max_examples: int | None = None, kind: str = GENERATION) -> list[Example]:
    """Parse a JSONL file, one example per non-blank line, in the format of the task kind."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise NotFound(f"data file {path.name!r} does not exist") from None
    except OSError as e:
        raise InvalidArgument(f"data file {path.name!r} cannot be read: {e.strerror or type(e).__name__}") from None
    examples = []
    for number, line in enumerate(raw.splitlines(), start=1):
        source = f"line {number}"
        try:
            # utf-8-sig: editors on Windows put a byte-order mark before the first line.
            text = line.decode("utf-8-sig" if number == 1 else "utf-8")
        except UnicodeDecodeError as e:
            raise InvalidArgument(f"{source}: not valid UTF-8 (byte {e.start})") from None
        if not text.strip():
            continue
        try:
            record = json.loads(text)
        except json.JSONDecodeError as e:
            raise InvalidArgument(f"{source}: not valid JSON: {e.msg} (column {e.colno})") from None
        except RecursionError:  # json's decoder recurses per level: '[' * 100000 exhausts the stack
            raise InvalidArgument(f"{source}: JSON nested too deeply") from None
        examples.append(_parse(record, source, kind))
        _check_count(len(examples), max_examples)
    if not examples:
        raise InvalidArgument(f"data file {path.name!r} holds no examples (one JSON object per line)")
    return examples


def parse_records(records: list, max_examples: int | None = None, kind: str = GENERATION) -> list[Example]:
    """Validate inline examples (a Train request's list of objects) exactly like file lines."""
    if not isinstance(records, list):
        raise InvalidArgument(f"examples must be a list of objects, got {_json_type(records)}")
    if not records:
        raise InvalidArgument("the data set is empty: give at least one example")
    _check_count(len(records), max_examples)
    return [_parse(r, f"example {i}", kind) for i, r in enumerate(records, start=1)]


def _parse(record, source: str, kind: str):
    return parse_record(record, source) if kind == GENERATION else parse_task_record(record, source, kind)


def parse_record(record, source: str) -> Example:
    if not isinstance(record, dict):
        raise InvalidArgument(f"{source}: expected a JSON object, got {_json_type(record)}")
    if "messages" in record:
        if "prompt" in record or "completion" in record:
            raise InvalidArgument(f"{source}: give either messages or prompt/completion, not both")
        return Example(source=source, messages=_parse_messages(record["messages"], source))
    for name in ("prompt", "completion"):
        if name not in record:
            raise InvalidArgument(f"{source}: missing field {name!r} (or give messages)")
        if not isinstance(record[name], str):
            raise InvalidArgument(f"{source}: field {name!r} must be a string, got {_json_type(record[name])}")
    if not record["completion"].strip():
        raise InvalidArgument(f"{source}: completion is empty: there is nothing to learn")
    return Example(source=source, prompt=record["prompt"], completion=record["completion"])


def _parse_messages(messages, source: str) -> tuple[tuple[str, str], ...]:
    if not isinstance(messages, list) or not messages:
        raise InvalidArgument(f"{source}: messages must be a non-empty array, got {_json_type(messages)}")
    out = []
    for i, message in enumerate(messages):
        where = f"{source}: messages[{i}]"
        if not isinstance(message, dict):
            raise InvalidArgument(f"{where} must be an object with role and content, got {_json_type(message)}")
        for name in ("role", "content"):
            if name not in message:
                raise InvalidArgument(f"{where}: missing field {name!r}")
            if not isinstance(message[name], str):
                raise InvalidArgument(f"{where}: field {name!r} must be a string, got {_json_type(message[name])}")
        if message["role"] not in ROLES:
            # The same roles Predict accepts: an adapter learns only what it can later be asked.
            raise InvalidArgument(f"{where}: role {message['role']!r} is not one of {', '.join(ROLES)}")
        out.append((message["role"], message["content"]))
    if not any(role == "assistant" and content.strip() for role, content in out):
        raise InvalidArgument(f"{source}: no non-empty assistant message: there is nothing to learn")
    return tuple(out)


def data_hash(examples: list[Example] | list[TaskExample]) -> str:
    digest = hashlib.sha256()
    for example in examples:
        line = json.dumps(example.canonical(), sort_keys=True, ensure_ascii=False, separators=(",", ":"))
        digest.update(line.encode())
        digest.update(b"\n")
    return digest.hexdigest()


def split_indices(count: int, eval_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Deterministic (train, eval) index lists; a non-zero fraction holds out at least one example,
    while at least one example is always left to train on."""
    eval_count = 0
    if eval_fraction > 0 and count >= 2:
        eval_count = min(count - 1, max(1, round(count * eval_fraction)))
    order = list(range(count))
    random.Random(seed).shuffle(order)
    return sorted(order[eval_count:]), sorted(order[:eval_count])


def prepare(examples: list[Example], tokenizer, settings: TrainSettings, eos_token_ids: list[int]) -> PreparedData:
    """Tokenize, mask and split; raises InvalidArgument for the first example that cannot be used."""
    if not examples:
        raise InvalidArgument("the data set is empty: give at least one example")
    if settings.task != GENERATION:
        return prepare_task(examples, tokenizer, settings)
    eos = list(eos_token_ids) or [tokenizer.eos_token_id]
    if eos[0] is None:
        raise InvalidArgument("the base model's tokenizer has no EOS token: completions could not learn to stop")
    chat = use_chat(settings.template, tokenizer)
    tokenized = [tokenize_example(e, tokenizer, chat=chat, max_length=settings.max_length, eos_token_ids=eos)
                 for e in examples]
    train_idx, eval_idx = split_indices(len(examples), settings.eval_fraction, settings.seed)
    stats = DataStats(
        examples=len(examples),
        train_examples=len(train_idx),
        eval_examples=len(eval_idx),
        truncated=sum(t.truncated for t in tokenized),
        tokens=sum(len(t.input_ids) for t in tokenized),
        completion_tokens=sum(t.label_tokens for t in tokenized),
    )
    return PreparedData(train=[tokenized[i] for i in train_idx], eval=[tokenized[i] for i in eval_idx],
                        stats=stats, data_hash=data_hash(examples))


def prepare_task(examples: list[TaskExample], tokenizer, settings: TrainSettings) -> PreparedData:
    """Label set, tokenization and split (by example: every window of a context on the same side)."""
    kind = settings.task
    examples = resolve_class_ids(examples, kind, settings.labels)
    labels, multi = label_set(examples, kind, settings.labels)
    options = settings.task_input()
    items = [tokenize_task(e, i, tokenizer, kind, labels, multi, settings.max_length, options)
             for i, e in enumerate(examples)]
    train_idx, eval_idx = split_indices(len(examples), settings.eval_fraction, settings.seed)
    # Training windows without the whole answer teach nothing about where it is: only the evaluation reads them.
    train = [t for i in train_idx for t in items[i] if kind != QA or t.target]
    if not train:
        raise InvalidArgument("no training example fits max_length with its answer: raise max_length")
    eval_items = [replace(t, example=j) for j, i in enumerate(eval_idx) for t in items[i]]
    flat = [t for group in items for t in group]
    stats = DataStats(examples=len(examples), train_examples=len(train_idx), eval_examples=len(eval_idx),
                      truncated=sum(t.truncated for t in flat), tokens=sum(len(t.input_ids) for t in flat),
                      completion_tokens=sum(t.label_tokens for t in flat))
    return PreparedData(train=train, eval=eval_items, stats=stats, data_hash=data_hash(examples),
                        task=TaskLabels(labels, multi), eval_examples=[examples[i] for i in eval_idx])


def collate(batch: list[Tokenized], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-padded input_ids, attention_mask and labels; right padding keeps each row's positions
    0..n-1 without position ids, and pads carry no loss."""
    width = max(len(t.input_ids) for t in batch)
    input_ids = torch.full((len(batch), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
    for row, t in enumerate(batch):
        n = len(t.input_ids)
        input_ids[row, :n] = torch.tensor(t.input_ids, dtype=torch.long)
        attention_mask[row, :n] = 1
        labels[row, :n] = torch.tensor(t.labels, dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def _check_count(count: int, max_examples: int | None) -> None:
    if max_examples is not None and count > max_examples:
        raise InvalidArgument(f"more than {max_examples} examples: the server's limit (--max-train-examples)")


def _json_type(value) -> str:
    return _JSON_TYPES.get(type(value), type(value).__name__)
