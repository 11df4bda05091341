"""Training data of the task kinds beside generation: parsed, checked against the label set, tokenized.

Formats (one JSON object per line or inline example; other keys are ignored):
- seq_cls: {"text", "label"} (single-label) or {"text", "labels": [...]} (multi-label; may be empty);
- token_cls: {"tokens": [...], "tags": [...]} (CoNLL style, BIO/IOB2 tags per word; "ner_tags" is
  read as "tags") or {"text", "entities": [{"start", "end", "label"}]} (character spans on word
  boundaries);
- qa: SQuAD's {"context", "question", "answers": {"text": [...], "answer_start": [...]}}.
Every problem is an InvalidArgument naming the line or example, as for generation data.

A label or tag may be an integer class id, as data sets exported from Hugging Face datasets store
them (sst2's "label": 1, conll2003's "ner_tags": [3, 0, 7]): with the `labels` setting it is the
name at that index (the names the data set's features list, in their order); a classification
label without `labels` is named by its digits, and integer tags need `labels` (BIO tags are names).

Inputs are built by core.tasks.inputs, exactly as the server builds requests. Tagging labels fall
on each word's first token only (its other sub-tokens are ignored in the loss, Transformers'
practice); question answering trains on every window of the context that holds the whole answer.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from loraserve.core.errors import InvalidArgument
from loraserve.core.tasks.answer import answer_to_token_span, check_answer
from loraserve.core.tasks.heads import MAX_LABELS, QA, SEQ_CLS, TOKEN_CLS
from loraserve.core.tasks.inputs import classification_ids, qa_windows, tagging_input
from loraserve.core.tasks.words import OUTSIDE, check_bio, entities_to_word_tags
from loraserve.trainer.render import IGNORE


@dataclass(frozen=True)
class TaskExample:
    source: str
    record: dict
    """The canonical content (the fields of its format), hashed to identify the data set."""
    text: str = ""
    labels: tuple[str, ...] = ()
    """seq_cls: its label (one) or labels (multi-label)."""
    multi: bool = False
    words: tuple[str, ...] = ()
    tags: tuple[str, ...] = ()
    question: str = ""
    context: str = ""
    answers: tuple[tuple[str, int], ...] = ()

    def canonical(self) -> dict:
        return self.record


@dataclass(frozen=True)
class TaskTokenized:
    """One model input with its target. For question answering an example gives one per window."""

    input_ids: list[int]
    source: str
    example: int
    """Index of its example in the data set (the windows of one context share it)."""
    target: list = field(default_factory=list)
    """seq_cls: [label index] or a 0/1 indicator per label; token_cls: a label per token (IGNORE on
    all but each word's first); qa: [start, end] token indices, or [] when the window lacks the answer."""
    read: list[int] = field(default_factory=list)
    """token_cls: the token read for each word; qa: the indices of the context tokens."""
    offsets: list = field(default_factory=list)
    """qa: each token's characters in the context (None for question tokens)."""
    truncated: bool = False

    @property
    def label_tokens(self) -> int:
        """Units of loss: labelled tokens for tagging, one per example otherwise."""
        if self.read and not self.offsets:
            return sum(1 for t in self.target if t != IGNORE)
        return 1


def _fail(source: str, message: str):
    raise InvalidArgument(f"{source}: {message}")


def _string(record: dict, name: str, source: str, *, empty_ok: bool = False) -> str:
    if name not in record:
        _fail(source, f"missing field {name!r}")
    value = record[name]
    if not isinstance(value, str):
        _fail(source, f"field {name!r} must be a string, got {type(value).__name__}")
    if not empty_ok and not value.strip():
        _fail(source, f"field {name!r} is empty")
    return value


def _strings(record: dict, name: str, source: str) -> list[str]:
    value = record.get(name)
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        _fail(source, f"field {name!r} must be an array of strings")
    return value


def _classes(record: dict, name: str, source: str) -> list:
    """An array of class names or integer class ids."""
    value = record.get(name)
    if not isinstance(value, list) or not all(isinstance(v, str) or _is_id(v) for v in value):
        _fail(source, f"field {name!r} must be an array of strings (or of integer class ids)")
    return value


def _is_id(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def resolve_class_ids(examples: list[TaskExample], kind: str, given: tuple[str, ...]) -> list[TaskExample]:
    """The examples with integer class ids replaced by names: given[id] when label names are given;
    without them a classification id is named by its digits, and tags cannot be (InvalidArgument)."""
    if kind not in (SEQ_CLS, TOKEN_CLS):
        return examples
    field_name = "tags" if kind == TOKEN_CLS else "labels"
    out = []
    for e in examples:
        values = getattr(e, field_name)
        if not any(_is_id(v) for v in values):
            out.append(e)
            continue
        names = [v if not _is_id(v) else _class_name(v, i, given, kind, e.source) for i, v in enumerate(values)]
        if kind == SEQ_CLS and len(set(names)) != len(names):
            _fail(e.source, "labels must be distinct")
        out.append(replace(e, **{field_name: tuple(names)}))
    return out


def _class_name(value: int, i: int, given: tuple[str, ...], kind: str, source: str) -> str:
    if given and 0 <= value < len(given):
        return given[value]
    if given:
        what = f"tag {value} of word {i}" if kind == TOKEN_CLS else f"label {value}"
        _fail(source, f"{what} is not an index of the {len(given)} labels given")
    if kind == TOKEN_CLS:
        _fail(source, f"tag {i} is the integer {value}: integer tags need the labels setting (the tag names by "
                      "index, as the data set's features list them)")
    return str(value)


def parse_task_record(record, source: str, kind: str) -> TaskExample:
    if not isinstance(record, dict):
        _fail(source, f"expected a JSON object, got {type(record).__name__}")
    if kind == SEQ_CLS:
        text = _string(record, "text", source)
        if ("label" in record) == ("labels" in record):
            _fail(source, "give label (one class) or labels (multi-label), exactly one of them")
        if "label" in record:
            label = record["label"]
            if isinstance(label, bool) or not isinstance(label, (str, int)) or label == "":
                _fail(source, "label must be a non-empty string (or an integer class)")
            return TaskExample(source, {"text": text, "label": label}, text=text, labels=(label,))
        labels = _classes(record, "labels", source)
        if len(set(labels)) != len(labels) or any(x == "" for x in labels):
            _fail(source, "labels must be distinct non-empty strings (or integer classes)")
        return TaskExample(source, {"text": text, "labels": labels}, text=text, labels=tuple(labels), multi=True)
    if kind == TOKEN_CLS:
        if "tokens" in record:
            field_name = "tags" if "tags" in record or "ner_tags" not in record else "ner_tags"
            words, tags = _strings(record, "tokens", source), _classes(record, field_name, source)
            if not words:
                _fail(source, "tokens is empty")
            if len(words) != len(tags):
                _fail(source, f"{len(words)} tokens but {len(tags)} tags: give one tag per token")
            try:
                check_bio(tags, ids=True)
            except InvalidArgument as e:
                _fail(source, str(e))
            return TaskExample(source, {"tokens": words, "tags": tags}, words=tuple(words), tags=tuple(tags))
        text = _string(record, "text", source)
        entities = record.get("entities")
        if not isinstance(entities, list):
            _fail(source, "give tokens and tags, or text and entities (an array of {start, end, label})")
        try:
            words, tags = entities_to_word_tags(text, entities)
        except InvalidArgument as e:
            _fail(source, str(e))
        if not words:
            _fail(source, "the text has no words")
        return TaskExample(source, {"text": text, "entities": entities}, text=text,
                           words=tuple(w for w, _, _ in words), tags=tuple(tags))
    if kind == QA:
        context = _string(record, "context", source)
        question = _string(record, "question", source)
        answers = record.get("answers")
        if not isinstance(answers, dict) or not isinstance(answers.get("text"), list) \
                or not isinstance(answers.get("answer_start"), list):
            _fail(source, 'answers must be {"text": [...], "answer_start": [...]} (SQuAD\'s format)')
        texts, starts = answers["text"], answers["answer_start"]
        if not texts or len(texts) != len(starts):
            _fail(source, "answers needs at least one text, with one answer_start per text")
        pairs = []
        for i, (t, s) in enumerate(zip(texts, starts)):
            if not isinstance(t, str) or not t.strip() or isinstance(s, bool) or not isinstance(s, int):
                _fail(source, f"answer {i}: text must be a non-empty string and answer_start an integer")
            try:
                check_answer(context, t, s)
            except InvalidArgument as e:
                _fail(source, f"answer {i}: {e}")
            pairs.append((t, s))
        return TaskExample(source, {"context": context, "question": question,
                                    "answers": {"text": texts, "answer_start": starts}},
                           question=question, context=context, answers=tuple(pairs))
    raise ValueError(f"not a task kind: {kind}")


def label_set(examples: list[TaskExample], kind: str, given: tuple[str, ...]) -> tuple[tuple[str, ...], bool]:
    """(labels, multi_label): the given label set (every example's labels must be in it) or the one the
    data uses. Tagging labels are BIO tags: O first, then B-/I- per entity type (types sorted)."""
    if kind == QA:
        return ("start", "end"), False
    multi = {e.multi for e in examples}
    if len(multi) > 1:
        first = next(e for e in examples if e.multi != examples[0].multi)
        raise InvalidArgument(f"{first.source}: mixes label and labels: a data set is single-label (label) or "
                              "multi-label (labels) throughout")
    is_multi = multi == {True}
    if kind == TOKEN_CLS:
        if given:
            types = [t for t in given if t != OUTSIDE]
            try:
                check_bio(types)
            except InvalidArgument as e:
                raise InvalidArgument(f"labels: {e}") from None
            if OUTSIDE not in given:  # O is always a tag (every word outside an entity has it): first, as by default
                given = (OUTSIDE, *given)
            allowed = set(given)
        else:
            entity_types = sorted({t[2:] for e in examples for t in e.tags if t != OUTSIDE})
            given = (OUTSIDE, *(f"{p}-{t}" for t in entity_types for p in ("B", "I")))
            allowed = set(given)
        for e in examples:
            for i, tag in enumerate(e.tags):
                if tag not in allowed:
                    raise InvalidArgument(f"{e.source}: tag {tag!r} of word {i} is not in the label set "
                                          f"({', '.join(sorted(allowed))[:200]})")
        return tuple(given), False
    if given:
        if len(given) < 2 and not is_multi:
            raise InvalidArgument(f"labels: {len(given)} label given; single-label classification needs at least 2")
        allowed = set(given)
        for e in examples:
            for label in e.labels:
                if label not in allowed:
                    raise InvalidArgument(f"{e.source}: label {label!r} is not in the label set "
                                          f"({', '.join(given)[:200]})")
        return tuple(given), is_multi
    labels = tuple(sorted({x for e in examples for x in e.labels}))
    if not labels or (len(labels) < 2 and not is_multi):
        raise InvalidArgument(f"the data has {len(labels)} distinct label(s); classification needs at least 2")
    if len(labels) > MAX_LABELS:
        raise InvalidArgument(f"the data has {len(labels)} distinct labels; at most {MAX_LABELS}")
    return labels, is_multi


def tokenize_task(example: TaskExample, index: int, tokenizer, kind: str, labels: tuple[str, ...], multi: bool,
                  max_length: int, options: dict) -> list[TaskTokenized]:
    if kind == SEQ_CLS:
        ids, truncated = classification_ids(tokenizer, example.text, max_length)
        if multi:
            target = [1 if x in example.labels else 0 for x in labels]
        else:
            target = [labels.index(example.labels[0])]
        return [TaskTokenized(ids, example.source, index, target, truncated=truncated)]
    if kind == TOKEN_CLS:
        inp = tagging_input(tokenizer, list(example.words), options.get("repeat", True), max_length)
        target = [IGNORE] * len(inp.input_ids)
        for w, t in enumerate(inp.word_tokens):
            target[t] = labels.index(example.tags[w])
        return [TaskTokenized(inp.input_ids, example.source, index, target, read=list(inp.word_tokens),
                              truncated=inp.words_kept < len(example.words))]
    out = []
    text, start = example.answers[0]
    for window in qa_windows(tokenizer, example.question, example.context, max_length,
                             options.get("doc_stride", 128)):
        span = answer_to_token_span(window.offsets, start, len(text))
        read = [i for i, o in enumerate(window.offsets) if o is not None]
        out.append(TaskTokenized(window.input_ids, example.source, index, list(span) if span else [], read=read,
                                 offsets=window.offsets))
    return out
