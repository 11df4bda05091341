"""How task inputs become token ids: the words read once or twice, QA contexts in windows after the question."""

from __future__ import annotations

import pytest
from loraserve.core.errors import InvalidArgument
from loraserve.core.tasks.inputs import REPEAT_SEPARATOR, question_ids, qa_windows, tagging_input
from loraserve.trainer import synthetic


@pytest.fixture(scope="module")
def tok():
    from loraserve.core.model.load import ensure_embedded_model
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(ensure_embedded_model())


def sep_ids(tok):
    return list(tok(REPEAT_SEPARATOR, add_special_tokens=False)["input_ids"])


def test_tagging_reads_each_word_in_the_second_copy(tok):
    words = ["Grace", "Tanaka", "joined", "Vantage", "Media", "in", "Lisbon", "."]
    once = tagging_input(tok, words, False, 512)
    twice = tagging_input(tok, words, True, 512)
    n, sep = len(once.input_ids), sep_ids(tok)
    assert twice.input_ids == once.input_ids + sep + once.input_ids
    assert twice.word_tokens == [n + len(sep) + t for t in once.word_tokens]
    assert once.words_kept == twice.words_kept == len(words)


def test_tagging_twice_cuts_whole_words_to_half_the_window(tok):
    words = [f"word{i}" for i in range(40)]
    inp = tagging_input(tok, words, True, 41)
    assert len(inp.input_ids) <= 41 and 0 < inp.words_kept < len(words)
    assert len(inp.word_tokens) == inp.words_kept


def test_qa_windows_read_the_context_after_the_question(tok):
    ex = synthetic.squad(1, seed=3, split="test")[0]
    q = question_ids(tok, ex["question"])
    enc = tok(ex["context"], add_special_tokens=False)["input_ids"]
    (w,) = qa_windows(tok, ex["question"], ex["context"], 512, 128)
    assert w.input_ids == q + enc and len(w.offsets) == len(w.input_ids)
    assert w.offsets[:len(q)] == [None] * len(q)  # the question's tokens are never part of an answer
    assert all(ex["context"][s:e] for s, e in w.offsets[len(q):])


def test_qa_windows_cover_a_long_context_within_max_tokens(tok):
    ex = synthetic.squad(3, seed=4, split="test")
    context = " ".join(e["context"] for e in ex)
    n = len(tok(context, add_special_tokens=False)["input_ids"])
    windows = qa_windows(tok, ex[0]["question"], context, 96, 16)
    assert len(windows) >= 2 and all(len(w.input_ids) <= 96 for w in windows)
    seen = set()
    for w in windows:
        seen |= {o for o in w.offsets if o is not None}
    assert len(seen) == n  # every context token is readable in some window


def test_qa_windows_refuse_a_question_that_leaves_no_room(tok):
    question = "Which " + "very " * 40 + "long question is this?"
    room = len(question_ids(tok, question))
    assert qa_windows(tok, question, "Some context here. " * 10, room + 8, 4)
    with pytest.raises(InvalidArgument, match="shorten the question"):
        qa_windows(tok, question, "Some context here. " * 10, room + 7, 4)
