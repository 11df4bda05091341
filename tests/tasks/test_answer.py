"""Extractive QA: best span, context windows, answer char span -> tokens, answer checks."""

from __future__ import annotations

import math
import re

import pytest
import torch
from loraserve.core.errors import InvalidArgument
from loraserve.core.tasks.answer import answer_to_token_span, best_span, check_answer, windows

T, F = True, False


@pytest.fixture(scope="module")
def tok():
    from loraserve.core.model.load import ensure_embedded_model
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(ensure_embedded_model())


def span(start, end, mask, max_tokens):
    return best_span(torch.tensor(start, dtype=torch.float32), torch.tensor(end, dtype=torch.float32),
                     torch.tensor(mask), max_tokens)


# --- best_span ---------------------------------------------------------------------------------

def test_best_span_and_its_probability():
    got = span([0.0, 1.0, 5.0, 0.0], [0.0, 0.0, 1.0, 6.0], [F, T, T, T], 3)
    assert got[:2] == (2, 3)  # 5 + 6
    # softmax over the context tokens 1..3 only: start logits 1, 5, 0 and end logits 0, 1, 6
    p_start = math.exp(5) / (math.exp(1) + math.exp(5) + math.exp(0))
    p_end = math.exp(6) / (math.exp(0) + math.exp(1) + math.exp(6))
    assert got[2] == pytest.approx(p_start * p_end, rel=1e-6)


def test_best_span_respects_max_answer_tokens_and_order():
    # the 0..3 span (10 + 10) is 4 tokens: too long for 3, and every allowed span scores 10;
    # ties go to the smallest start, then the smallest end
    assert span([10.0, 0, 0, 0], [0, 0, 0, 10.0], [T] * 4, 3)[:2] == (0, 0)
    assert span([10.0, 0, 0, 0], [0, 0, 0, 10.0], [T] * 4, 4)[:2] == (0, 3)
    # end before start is never a span: (1, 0) would score 20
    assert span([1.0, 10.0], [10.0, 0.0], [T, T], 5)[:2] == (0, 0)
    # max_answer_tokens=1: start == end only
    assert span([0.0, 3.0, 2.0], [0.0, 1.0, 4.0], [T, T, T], 1)[:2] == (2, 2)  # 2+4 > 3+1


def test_best_span_ignores_tokens_outside_the_context():
    # the question token 0 and the padding token 4 have the largest logits
    got = span([50.0, 1.0, 2.0, 0.0, 50.0], [50.0, 0.0, 0.0, 3.0, 50.0], [F, T, T, T, F], 30)
    assert got[:2] == (2, 3)
    # one context token: the only span, with probability 1
    got = span([9.0, -5.0, 9.0], [9.0, -7.0, 9.0], [F, T, F], 4)
    assert got[:2] == (1, 1) and got[2] == pytest.approx(1.0)


def test_best_span_none_without_context():
    assert span([1.0, 2.0], [1.0, 2.0], [F, F], 3) is None
    assert best_span(torch.zeros(0), torch.zeros(0), torch.zeros(0, dtype=torch.bool), 3) is None


def test_best_span_matches_brute_force():
    gen = torch.Generator().manual_seed(0)
    for trial in range(20):
        n = int(torch.randint(1, 40, (1,), generator=gen))
        start, end = torch.randn(n, generator=gen) * 3, torch.randn(n, generator=gen) * 3
        mask = torch.rand(n, generator=gen) < 0.7
        limit = int(torch.randint(1, 8, (1,), generator=gen))
        ctx = [i for i in range(n) if mask[i]]
        pairs = [(float(start[i] + end[j]), i, j) for i in ctx for j in ctx if i <= j < i + limit]
        got = best_span(start, end, mask, limit)
        if not pairs:
            assert got is None
            continue
        best = max(pairs, key=lambda p: (p[0], -p[1], -p[2]))
        assert got[:2] == best[1:], trial
        z_start = sum(math.exp(float(start[i])) for i in ctx)
        z_end = sum(math.exp(float(end[j])) for j in ctx)
        expected = math.exp(float(start[best[1]])) / z_start * math.exp(float(end[best[2]])) / z_end
        assert got[2] == pytest.approx(expected, rel=1e-4)


def test_best_span_accepts_half_precision_and_int_mask():
    start = torch.tensor([0.0, 2.0, 1.0], dtype=torch.bfloat16)
    end = torch.tensor([0.0, 1.0, 3.0], dtype=torch.bfloat16)
    got = best_span(start, end, torch.tensor([0, 1, 1]), 2)
    assert got[:2] == (1, 2) and 0.0 < got[2] <= 1.0


def test_best_span_rejects():
    with pytest.raises(InvalidArgument, match="max_answer_tokens must be a positive integer"):
        span([1.0], [1.0], [T], 0)
    with pytest.raises(InvalidArgument, match="1-D and of one length"):
        best_span(torch.zeros(3), torch.zeros(2), torch.ones(3, dtype=torch.bool), 2)
    with pytest.raises(InvalidArgument, match="1-D"):
        best_span(torch.zeros(1, 3), torch.zeros(1, 3), torch.ones(1, 3, dtype=torch.bool), 2)


# --- windows -----------------------------------------------------------------------------------

@pytest.mark.parametrize("length, size, stride, expected", [
    (10, 4, 2, [(0, 4), (2, 6), (4, 8), (6, 10)]),
    (11, 4, 2, [(0, 4), (2, 6), (4, 8), (6, 10), (8, 11)]),
    (9, 4, 0, [(0, 4), (4, 8), (8, 9)]),
    (8, 4, 3, [(0, 4), (1, 5), (2, 6), (3, 7), (4, 8)]),
    (4, 4, 2, [(0, 4)]),
    (3, 4, 2, [(0, 3)]),
    (1, 1, 0, [(0, 1)]),
    (0, 4, 2, []),
])
def test_windows(length, size, stride, expected):
    assert windows(length, size, stride) == expected


def test_windows_cover_everything_with_exact_overlap():
    for length in range(0, 40):
        for size in range(1, 9):
            for stride in range(size):
                got = windows(length, size, stride)
                covered = {t for s, e in got for t in range(s, e)}
                assert covered == set(range(length))
                assert all(0 < e - s <= size for s, e in got)
                assert all(a[1] - b[0] == stride for a, b in zip(got, got[1:]))
                assert not got or got[-1][1] == length


@pytest.mark.parametrize("size, stride", [(5, 2), (7, 3), (4, 0)])
def test_windows_match_transformers_overflow(tok, size, stride):
    ids = tok(" ".join(f"w{i}" for i in range(9)), add_special_tokens=False)["input_ids"]
    hf = tok(" ".join(f"w{i}" for i in range(9)), add_special_tokens=False, truncation=True,
             max_length=size, stride=stride, return_overflowing_tokens=True)["input_ids"]
    assert [ids[s:e] for s, e in windows(len(ids), size, stride)] == hf


@pytest.mark.parametrize("args, message", [
    ((10, 0, 0), "max_context_tokens must be a positive integer"),
    ((10, 4, 4), "stride must be an integer in [0, max_context_tokens=4)"),
    ((10, 4, -1), "stride must be"),
    ((-1, 4, 1), "context length must be a non-negative integer"),
    ((10, 4.0, 1), "max_context_tokens"),
])
def test_windows_rejects(args, message):
    with pytest.raises(InvalidArgument, match=re.escape(message)):
        windows(*args)


# --- answer_to_token_span ----------------------------------------------------------------------

CONTEXT = "John lives in Paris, France."
OFFSETS = [(0, 4), (4, 10), (10, 13), (13, 19), (19, 20), (20, 27), (27, 28)]  # the real tokenizer's


@pytest.mark.parametrize("answer, token_span", [
    ("John", (0, 0)), ("Paris", (3, 3)), ("Paris, France", (3, 5)), ("France.", (5, 6)),
    ("lives in", (1, 2)), (",", (4, 4)), ("aris", (3, 3)),  # inside a token: the whole token
])
def test_answer_to_token_span(answer, token_span):
    assert answer_to_token_span(OFFSETS, CONTEXT.index(answer), len(answer)) == token_span


def test_answer_to_token_span_in_windows():
    # a window of context tokens 4..6 after two question tokens
    window = [None, None, (19, 20), (20, 27), (27, 28)]
    assert answer_to_token_span(window, 21, 6) == (3, 3)  # France
    assert answer_to_token_span(window, 14, 5) is None  # Paris: before the window
    assert answer_to_token_span(window, 14, 13) is None  # Paris, France: only partly inside
    assert answer_to_token_span(OFFSETS[:2], 5, 8) is None  # "lives in" is cut by the end
    # special tokens (0, 0) are not context, wherever they are
    assert answer_to_token_span([(0, 0), (0, 4), (4, 10), (0, 0)], 5, 5) == (2, 2)
    assert answer_to_token_span([], 0, 1) is None
    assert answer_to_token_span([None, (0, 0)], 0, 1) is None


def test_answer_to_token_span_multi_token_chars(tok):
    context = "日本の首都は東京です"
    enc = tok(context, add_special_tokens=False, return_offsets_mapping=True)
    offsets = [tuple(o) for o in enc["offset_mapping"]]
    first, last = answer_to_token_span(offsets, context.index("東京"), 2)
    assert tok.decode(enc["input_ids"][first:last + 1]) == "東京"


def test_answers_found_in_some_window(tok):
    """The training path end to end: tokenize a long context, window it, label each window."""
    context = " ".join(f"Sentence {i} mentions item{i * 7}." for i in range(40))
    enc = tok(context, add_special_tokens=False, return_offsets_mapping=True)
    offsets = [tuple(o) for o in enc["offset_mapping"]]
    for answer in ("item0", "item70", "item273", "Sentence 39"):
        start = context.index(answer)
        hits = []
        for s, e in windows(len(offsets), 24, 8):
            got = answer_to_token_span(offsets[s:e], start, len(answer))
            if got is not None:
                hits.append(got)
                assert tok.decode(enc["input_ids"][s + got[0]:s + got[1] + 1]).strip() == answer
        assert hits, answer


def test_answer_to_token_span_rejects():
    with pytest.raises(InvalidArgument, match="answer_start must be a non-negative integer"):
        answer_to_token_span(OFFSETS, -1, 3)
    with pytest.raises(InvalidArgument, match="answer length must be a positive integer"):
        answer_to_token_span(OFFSETS, 0, 0)


# --- check_answer ------------------------------------------------------------------------------

def test_check_answer():
    check_answer(CONTEXT, "Paris", 14)
    check_answer("café 東京 🙂", "東京", 5)
    check_answer("🙂", "🙂", 0)


@pytest.mark.parametrize("context, answer, start, message", [
    ("the cat saw the cat", "cat", 0,
     "the answer 'cat' is not found at answer_start 0 of its context; it occurs at 4, 16"),
    ("aaaaa", "aa", 9, "the answer 'aa' is not found at answer_start 9 of its context; it occurs at "
                       "0, 1, 2 and later"),
    (CONTEXT, "Berlin", 14, "the answer 'Berlin' is not found at answer_start 14 of its context; it "
                            "does not occur in the context at all"),
    (CONTEXT, "Paris", -14, "not found at answer_start -14 of its context; it occurs at 14"),
    (CONTEXT, "paris", 14, "the answer 'paris' is not found at answer_start 14 of its context; it "
                           "does not occur"),  # case matters
    (CONTEXT, "France.", 22, "not found at answer_start 22 of its context; it occurs at 21"),
    (CONTEXT, "", 0, "the answer text is empty"),
    (CONTEXT, "Paris", "14", "answer_start must be an integer"),
    (CONTEXT, None, 0, "context and answer text must be strings"),
])
def test_check_answer_rejects(context, answer, start, message):
    with pytest.raises(InvalidArgument, match=re.escape(message)):
        check_answer(context, answer, start)


def test_check_answer_shortens_long_answers():
    long = "x" * 100
    with pytest.raises(InvalidArgument, match=re.escape("the answer '" + "x" * 37 + "...' is not")):
        check_answer("y", long, 0)
