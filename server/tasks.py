"""Classify, Tag and Answer as the service sees them, without protobuf: the input built as the adapter's
training built it (core.tasks.inputs, options from its metadata), one prefill-only engine request
per input (a question-answering context may take several windows, all in flight at once), and the
head's logits turned into labels, entities or answer spans.

Tokenizing and decoding results run off the event loop; the engine batches these rows with every
other request.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import torch
from loraserve.core.errors import InvalidArgument
from loraserve.core.prompt import check_fits
from loraserve.core.tasks.answer import char_span, top_spans
from loraserve.core.tasks.heads import MAX_LABELS, QA, SEQ_CLS, TOKEN_CLS
from loraserve.core.tasks.inputs import (
    DEFAULT_MAX_ANSWER_TOKENS,
    DEFAULT_STRIDE,
    classification_ids,
    qa_windows,
    tagging_input,
)
from loraserve.core.tasks.words import Entity, split_words, word_spans_to_entities
from loraserve.server.engine.types import Finished, SamplingParams, Timings
from loraserve.server.generation import run

MAX_QA_WINDOWS = 16
"""A context is read in at most this many windows (requests); longer ones are refused by size."""


@dataclass(frozen=True)
class LabelScore:
    label: str
    probability: float


@dataclass(frozen=True)
class Classification:
    labels: list[LabelScore]
    """Most likely first."""
    predicted: list[str]
    multi_label: bool
    prompt_tokens: int
    timings: Timings


@dataclass(frozen=True)
class Tagging:
    entities: list[Entity]
    prompt_tokens: int
    timings: Timings


@dataclass(frozen=True)
class AnswerSpan:
    text: str
    start: int
    end: int
    score: float


@dataclass(frozen=True)
class Answers:
    answers: list[AnswerSpan]
    prompt_tokens: int
    timings: Timings


_NO_SAMPLING = SamplingParams(max_new_tokens=0)


def _check_adapter(adapter_id: str | None, what: str) -> str:
    if not adapter_id:
        raise InvalidArgument(f"adapter_id is required: {what} runs a task adapter's head")
    return adapter_id


async def _head(engine, metrics, adapter_id: str, ids: list[int], kind: str, deadline) -> Finished:
    async for event in run(engine, metrics, adapter_id, ids, _NO_SAMPLING, deadline, kind=kind):
        if isinstance(event, Finished):
            return event
    raise RuntimeError("the engine ended a task request without its result")


async def classify(engine, tokenizer, metrics, adapter_id: str | None, text: str, top_k: int = 0,
                   deadline: float | None = None) -> Classification:
    adapter_id = _check_adapter(adapter_id, "Classify")
    if not text.strip():
        raise InvalidArgument("the text is empty")
    if not 0 <= top_k <= MAX_LABELS:
        raise InvalidArgument(f"top_k must lie in [0, {MAX_LABELS}], got {top_k}")
    limit = engine.max_prompt_tokens

    def build() -> list[int]:
        check_fits(tokenizer, [text], limit, "the text")
        ids, truncated = classification_ids(tokenizer, text, limit)
        if truncated:
            raise InvalidArgument(f"the text has more than {limit} tokens, the limit")
        return ids

    ids = await asyncio.to_thread(build)
    done = await _head(engine, metrics, adapter_id, ids, SEQ_CLS, deadline)
    spec, logits = done.head, done.head_logits[0]  # [labels]
    probs = logits.sigmoid() if spec.multi_label else logits.softmax(-1)
    order = torch.argsort(probs, descending=True, stable=True).tolist()
    scores = [LabelScore(spec.labels[i], float(probs[i])) for i in order]
    predicted = ([s.label for s in scores if s.probability >= spec.threshold] if spec.multi_label
                 else [scores[0].label])
    return Classification(scores[:top_k] if top_k else scores, predicted, spec.multi_label, len(ids), done.timings)


async def tag(engine, tokenizer, metrics, adapter_id: str | None, text: str,
              deadline: float | None = None) -> Tagging:
    adapter_id = _check_adapter(adapter_id, "Tag")
    if not text.strip():
        raise InvalidArgument("the text is empty")
    limit = engine.max_prompt_tokens
    options = await asyncio.to_thread(engine.registry.task_input, adapter_id)
    repeat = options.get("repeat", False)  # a PEFT adapter made elsewhere read the words once

    def build():
        check_fits(tokenizer, [text, text] if repeat else [text], limit, "the text")
        words = split_words(text)
        if not words:
            raise InvalidArgument("the text has no words")
        inp = tagging_input(tokenizer, [w for w, _, _ in words], repeat, limit)
        if inp.words_kept < len(words):
            raise InvalidArgument(f"the text has more words than {limit} tokens hold (the limit"
                                  f"{', read twice' if repeat else ''})")
        return words, inp

    words, inp = await asyncio.to_thread(build)
    done = await _head(engine, metrics, adapter_id, inp.input_ids, TOKEN_CLS, deadline)
    spec = done.head
    probs = done.head_logits[inp.word_tokens].softmax(-1)  # [words, tags]
    best, index = probs.max(-1)
    tags = [spec.labels[i] for i in index.tolist()]
    entities = word_spans_to_entities(words, tags, best.tolist(), text)
    return Tagging(entities, len(inp.input_ids), done.timings)


async def answer(engine, tokenizer, metrics, adapter_id: str | None, question: str, context: str, top_k: int = 1,
                 max_answer_tokens: int = 0, deadline: float | None = None) -> Answers:
    adapter_id = _check_adapter(adapter_id, "Answer")
    if not question.strip():
        raise InvalidArgument("the question is empty")
    if not context.strip():
        raise InvalidArgument("the context is empty: extractive QA finds its answer in the context")
    if not 0 <= top_k <= 20:
        raise InvalidArgument(f"top_k must lie in [0, 20], got {top_k}")
    if not 0 <= max_answer_tokens <= engine.max_prompt_tokens:
        raise InvalidArgument(f"max_answer_tokens must lie in [0, {engine.max_prompt_tokens}]")
    limit = engine.max_prompt_tokens
    options = await asyncio.to_thread(engine.registry.task_input, adapter_id)
    longest = max_answer_tokens or options.get("max_answer_tokens", DEFAULT_MAX_ANSWER_TOKENS)

    def build():
        check_fits(tokenizer, [question], limit, "the question")
        check_fits(tokenizer, [context], limit * MAX_QA_WINDOWS, "the context")
        windows = qa_windows(tokenizer, question, context, limit, options.get("doc_stride", DEFAULT_STRIDE))
        if len(windows) > MAX_QA_WINDOWS:
            raise InvalidArgument(f"the context needs {len(windows)} windows of {limit} tokens; the limit is "
                                  f"{MAX_QA_WINDOWS}")
        return windows

    windows = await asyncio.to_thread(build)
    tasks = [asyncio.ensure_future(_head(engine, metrics, adapter_id, w.input_ids, QA, deadline)) for w in windows]
    try:
        results = await asyncio.gather(*tasks)
    finally:
        for t in tasks:  # one window failed: the others are cancelled (their rows freed), not left running
            t.cancel()
    spans: dict[tuple[int, int], float] = {}
    for w, done in zip(windows, results):
        mask = torch.tensor([o is not None for o in w.offsets], dtype=torch.bool)
        logits = done.head_logits  # [window tokens, 2]
        for start, end, score in top_spans(logits[:, 0], logits[:, 1], mask, longest, max(1, top_k)):
            key = char_span(context, w.offsets, start, end)
            spans[key] = max(score, spans.get(key, 0.0))  # a span in two overlapping windows: its best
    best = sorted(spans.items(), key=lambda kv: (-kv[1], kv[0]))[: max(1, top_k)]
    slowest = max(results, key=lambda d: d.timings.total_seconds).timings
    return Answers([AnswerSpan(context[s:e], s, e, score) for (s, e), score in best],
                   sum(len(w.input_ids) for w in windows), slowest)
