"""How a task request's input becomes token ids: one definition, used by the trainer for its examples
and by the server for requests, so an adapter is always asked what it learned on.

- seq_cls: the text as the tokenizer encodes it by default (special tokens included), which is
  what Transformers' pipelines and a stock PEFT model are fed; the head reads the last token.
- token_cls: the text split into words (core.tasks.words), joined by single spaces. A decoder's
  token has seen only the words before it, so by default the words go in twice, separated by a
  newline, and the head reads each word's first token in the second copy, which has seen the
  whole sentence (input option "repeat"; off, the single copy is read, as stock PEFT does).
- qa: "Question: <question>\nContext:\n" then the context's tokens, so every context token has
  read the question; contexts longer than the window are read in windows overlapping by
  "doc_stride" tokens (Transformers' doc_stride).

The options a trainer used are recorded in the adapter's metadata ("task" -> "input").
"""

from __future__ import annotations

from dataclasses import dataclass

from loraserve.core.errors import FailedPrecondition, InvalidArgument
from loraserve.core.tasks.answer import windows
from loraserve.core.tasks.words import encode_words

REPEAT_SEPARATOR = "\n"
QUESTION_PREFIX = "Question: {question}\nContext:\n"
DEFAULT_STRIDE = 128
DEFAULT_MAX_ANSWER_TOKENS = 30
_OPTIONS = {"repeat": bool, "doc_stride": int, "max_answer_tokens": int}


def check_options(options: dict) -> dict:
    """A metadata "input" object: the known options with their types; FailedPrecondition otherwise."""
    unknown = sorted(str(k)[:40] for k in options if k not in _OPTIONS)
    if unknown:
        raise FailedPrecondition(f"loraserve_metadata.json: unknown task input option(s) {', '.join(unknown)}")
    for name, value in options.items():
        kind = _OPTIONS[name]
        if type(value) is not kind or (kind is int and not 0 <= value <= 1 << 20):
            raise FailedPrecondition(f"loraserve_metadata.json: task input {name} must be "
                                     f"{'a boolean' if kind is bool else 'a whole number'}")
    return dict(options)


def classification_ids(tokenizer, text: str, max_tokens: int) -> tuple[list[int], bool]:
    """(ids, truncated): the text's tokens, cut to max_tokens at the end."""
    ids = list(tokenizer(text, add_special_tokens=True)["input_ids"])
    return ids[:max_tokens], len(ids) > max_tokens


@dataclass(frozen=True)
class TaggingInput:
    input_ids: list[int]
    word_tokens: list[int]
    """Per kept word: the index of the token whose hidden state the head reads."""
    words_kept: int
    """Words that fit max_tokens (the first ones); the rest are cut."""


def tagging_input(tokenizer, words: list[str], repeat: bool, max_tokens: int) -> TaggingInput:
    """The words as model input, cut to max_tokens (whole words from the end)."""
    if not repeat:
        enc = encode_words(tokenizer, words, max_tokens=max_tokens)
        return TaggingInput(enc.input_ids, enc.word_first_token, enc.words_kept)
    sep = list(tokenizer(REPEAT_SEPARATOR, add_special_tokens=False)["input_ids"])
    half = (max_tokens - len(sep)) // 2
    if half < 1:
        raise InvalidArgument(f"max_tokens {max_tokens} leaves no room for the repeated words")
    enc = encode_words(tokenizer, words, max_tokens=half)
    offset = len(enc.input_ids) + len(sep)
    return TaggingInput(enc.input_ids + sep + enc.input_ids, [offset + t for t in enc.word_first_token],
                        enc.words_kept)


@dataclass(frozen=True)
class QAWindow:
    input_ids: list[int]
    offsets: list[tuple[int, int] | None]
    """Per token: its (start, end) characters in the context; None for the question's tokens."""


def question_ids(tokenizer, question: str) -> list[int]:
    return list(tokenizer(QUESTION_PREFIX.format(question=question), add_special_tokens=True)["input_ids"])


def qa_windows(tokenizer, question: str, context: str, max_tokens: int, stride: int) -> list[QAWindow]:
    """The (question, context window) inputs covering the whole context."""
    q = question_ids(tokenizer, question)
    room = max_tokens - len(q)
    if room < 8:
        raise InvalidArgument(f"the question takes {len(q)} of the {max_tokens} tokens a window holds, leaving no "
                              "room for the context: shorten the question")
    enc = tokenizer(context, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]
    out = []
    for start, end in windows(len(ids), room, min(stride, room - 1)):
        out.append(QAWindow(q + ids[start:end], [None] * len(q) + offsets[start:end]))
    return out
