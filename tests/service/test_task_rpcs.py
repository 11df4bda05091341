"""Classify, Tag and Answer through a real channel (tiny random Llama, fp32): task adapters made by stock
PEFT serve with stock PEFT's scores, mixed-kind batches equal the same requests served alone, and bad
input gets its own status without touching anyone else's request."""

from __future__ import annotations

import json
import shutil
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
import torch
from harness import RunningServer, copy_adapters
from loraserve.core.tasks.inputs import qa_windows, tagging_input
from loraserve.core.tasks.words import split_words, word_spans_to_entities
from tiny_models import TAGS, stock_task_model
from transformers import AutoTokenizer

TEXTS = ["The service was quick and friendly", "Rain again", "Shares of Acme rose after the merger talks",
         "John Smith flew from Paris to Berlin on Monday."]
QUESTION, CONTEXT = "Who founded Acme?", "Acme was founded in Paris by John Smith in 1990. It makes tools."


@pytest.fixture(scope="module")
def srv(tiny_model_dir, adapter_sources, task_adapter_sources, tmp_path_factory):
    root = copy_adapters(adapter_sources, tmp_path_factory.mktemp("root"))
    copy_adapters(task_adapter_sources, root, ("t-cls", "t-tag", "t-qa"))
    shutil.copytree(task_adapter_sources / "t-cls", root / "t-multi")
    (root / "t-multi" / "loraserve_metadata.json").write_text(json.dumps(
        {"task": {"labels": ["sports", "politics", "tech"], "multi_label": True, "threshold": 0.4}}))
    s = RunningServer(tiny_model_dir, root, max_batch_size=16, max_prefill_tokens=24)
    yield s
    s.close()


def _peft(tiny_model_dir, adapter_dir, kind: str, num_labels: int):
    from peft import PeftModel

    return PeftModel.from_pretrained(stock_task_model(tiny_model_dir, kind, num_labels), adapter_dir).eval()


def test_classify_gives_stock_peft_scores(srv, tiny_model_dir, task_adapter_sources):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = _peft(tiny_model_dir, task_adapter_sources / "t-cls", "seq_cls", 3)
    for text in TEXTS:
        got = srv.client.classify(text, adapter_id="t-cls")
        with torch.no_grad():
            want = model(**tok(text, return_tensors="pt")).logits[0].softmax(-1)
        assert [label for label, _ in got.labels] == [f"LABEL_{i}" for i in want.argsort(descending=True).tolist()]
        assert torch.allclose(torch.tensor([p for _, p in got.labels]), want.sort(descending=True).values, atol=1e-5)
        assert got.predicted == [got.labels[0][0]] and not got.multi_label
        assert got.prompt_tokens == len(tok(text)["input_ids"])
        assert sum(p for _, p in got.labels) == pytest.approx(1.0, abs=1e-5)
    top = srv.client.classify(TEXTS[0], adapter_id="t-cls", top_k=2)
    assert len(top.labels) == 2 and top.labels[0][1] >= top.labels[1][1]
    info = srv.client.get_adapter("t-cls")
    assert info.task_type == "SEQ_CLS" and info.labels == ("LABEL_0", "LABEL_1", "LABEL_2")
    assert srv.client.get_adapter("t-multi").labels == ("sports", "politics", "tech")


def test_multi_label_uses_sigmoids_and_the_adapters_threshold(srv, tiny_model_dir, task_adapter_sources):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = _peft(tiny_model_dir, task_adapter_sources / "t-cls", "seq_cls", 3)
    for text in TEXTS:
        got = srv.client.classify(text, adapter_id="t-multi")
        with torch.no_grad():
            probs = model(**tok(text, return_tensors="pt")).logits[0].sigmoid()
        names = ["sports", "politics", "tech"]
        assert got.multi_label
        assert dict(got.labels) == pytest.approx({n: float(p) for n, p in zip(names, probs)}, abs=1e-5)
        assert sorted(got.predicted) == sorted(n for n, p in zip(names, probs) if p >= 0.4)


def test_tag_gives_stock_peft_entities(srv, tiny_model_dir, task_adapter_sources):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = _peft(tiny_model_dir, task_adapter_sources / "t-tag", "token_cls", 5)
    for text in TEXTS:
        words = split_words(text)
        inp = tagging_input(tok, [w for w, _, _ in words], False, 512)  # no "repeat" recorded: read once
        with torch.no_grad():
            probs = model(input_ids=torch.tensor([inp.input_ids])).logits[0, inp.word_tokens].softmax(-1)
        best, index = probs.max(-1)
        want = word_spans_to_entities(words, [TAGS[i] for i in index.tolist()], best.tolist(), text)
        got = srv.client.tag(text, adapter_id="t-tag")
        assert [(e.label, e.start, e.end, e.text) for e in got] == [(e.label, e.start, e.end, e.text) for e in want]
        assert [e.score for e in got] == pytest.approx([e.score for e in want], abs=1e-5)
        assert all(text[e.start:e.end] == e.text for e in got)


def test_answer_gives_stock_peft_spans(srv, tiny_model_dir, task_adapter_sources):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = _peft(tiny_model_dir, task_adapter_sources / "t-qa", "qa", 2)
    window = qa_windows(tok, QUESTION, CONTEXT, 512, 128)[0]
    with torch.no_grad():
        out = model(input_ids=torch.tensor([window.input_ids]))
    context = torch.tensor([o is not None for o in window.offsets])
    start = out.start_logits[0].masked_fill(~context, float("-inf"))
    end = out.end_logits[0].masked_fill(~context, float("-inf"))
    got = srv.client.answer(QUESTION, CONTEXT, adapter_id="t-qa", top_k=3)
    assert 1 <= len(got) <= 3 and got[0].score >= got[-1].score
    best = got[0]
    assert CONTEXT[best.start:best.end] == best.text
    assert best.text == best.text.strip()  # the space a BPE token carries before its word is not the answer
    s = next(i for i, o in enumerate(window.offsets) if o is not None and o[0] <= best.start < o[1])
    e = max(i for i, o in enumerate(window.offsets) if o is not None and o[1] == best.end)
    assert best.score == pytest.approx(float(start.softmax(-1)[s] * end.softmax(-1)[e]), rel=1e-4)
    # No other span within 30 tokens scores higher than the one served.
    total = start[:, None] + end[None, :]
    band = torch.triu(torch.ones_like(total, dtype=torch.bool)) & torch.tril(torch.ones_like(total, dtype=torch.bool), 29)
    assert float(total[s, e]) == pytest.approx(float(total.masked_fill(~band, float("-inf")).max()), abs=1e-4)


def test_long_context_is_read_in_windows(srv):
    context = " ".join([CONTEXT] * 60)  # ~1,000 tokens: several windows of the 512-token limit... or fewer
    got = srv.client.answer(QUESTION, context, adapter_id="t-qa")
    assert got and context[got[0].start:got[0].end] == got[0].text


def test_mixed_kinds_in_one_batch_equal_the_same_requests_alone(srv):
    calls = [("classify", t, "t-cls") for t in TEXTS] + [("tag", t, "t-tag") for t in TEXTS] \
        + [("answer", CONTEXT, "t-qa"), ("predict", TEXTS[1], "a0"), ("predict", TEXTS[2], "a1"),
           ("classify", TEXTS[3], "t-multi")]

    def one(call):
        kind, text, adapter = call
        c = srv.client
        if kind == "classify":
            return c.classify(text, adapter_id=adapter).labels
        if kind == "tag":
            return [(e.label, e.start, e.end, round(e.score, 4)) for e in c.tag(text, adapter_id=adapter)]
        if kind == "answer":
            return [(a.start, a.end, round(a.score, 4)) for a in c.answer(QUESTION, text, adapter_id=adapter)]
        return c.predict(text, adapter_id=adapter, max_new_tokens=12).text

    alone = [one(c) for c in calls]
    with ThreadPoolExecutor(len(calls)) as pool:
        together = list(pool.map(one, calls * 2))
    for i, (want, got) in enumerate(zip(alone * 2, together)):
        if calls[i % len(calls)][0] == "classify":
            assert [n for n, _ in got] == [n for n, _ in want]
            assert [p for _, p in got] == pytest.approx([p for _, p in want], abs=1e-5)
        else:
            assert got == want, calls[i % len(calls)]


@pytest.mark.parametrize("call,code,words", [
    (lambda c: c.classify("Hello", adapter_id="a0"), "FAILED_PRECONDITION", "generation adapter, not a seq_cls one: call Predict"),
    (lambda c: c.classify("Hello", adapter_id="t-tag"), "FAILED_PRECONDITION", "token_cls"),
    (lambda c: c.tag("Hello", adapter_id="t-cls"), "FAILED_PRECONDITION", "seq_cls"),
    (lambda c: c.answer("Who?", "Him.", adapter_id="t-cls"), "FAILED_PRECONDITION", "seq_cls"),
    (lambda c: c.predict("Hello", adapter_id="t-cls"), "FAILED_PRECONDITION", "Classify"),
    (lambda c: c.classify("   ", adapter_id="t-cls"), "INVALID_ARGUMENT", "empty"),
    (lambda c: c.classify("Hello", adapter_id=""), "INVALID_ARGUMENT", "adapter_id"),
    (lambda c: c.classify("Hello", adapter_id="nope"), "NOT_FOUND", "nope"),
    (lambda c: c.classify("word " * 5000, adapter_id="t-cls"), "INVALID_ARGUMENT", "limit"),
    (lambda c: c.classify("Hello", adapter_id="t-cls", top_k=100000), "INVALID_ARGUMENT", "top_k"),
    (lambda c: c.tag("", adapter_id="t-tag"), "INVALID_ARGUMENT", "empty"),
    (lambda c: c.tag("...", adapter_id="t-tag"), "OK", ""),
    (lambda c: c.answer("Who?", "", adapter_id="t-qa"), "INVALID_ARGUMENT", "context"),
    (lambda c: c.answer("", "Some context.", adapter_id="t-qa"), "INVALID_ARGUMENT", "question"),
    (lambda c: c.answer("why " * 600, "Some context.", adapter_id="t-qa"), "INVALID_ARGUMENT", "question"),
    (lambda c: c.answer("Who?", "x " * 200_000, adapter_id="t-qa"), "INVALID_ARGUMENT", "context"),
])
def test_bad_input_gets_its_status_and_others_are_unaffected(srv, call, code, words):
    neighbour = srv.client.stream(TEXTS[0], adapter_id="a2", max_new_tokens=24)
    first = next(neighbour)  # a request of another adapter is running meanwhile
    if code == "OK":
        call(srv.client)
    else:
        with pytest.raises(grpc.RpcError) as e:
            call(srv.client)
        assert e.value.code().name == code, e.value.details()
        assert words in e.value.details()
    rest = list(neighbour)
    assert rest[-1].finish_reason == "length" and rest[-1].completion.generated_tokens == 24 and first is not None
    assert srv.client.classify(TEXTS[1], adapter_id="t-cls").labels


def test_the_generic_engine_refuses_task_adapters_clearly(tiny_model_dir, task_adapter_sources, tmp_path):
    root = copy_adapters(task_adapter_sources, tmp_path / "root", ("t-cls",))
    s = RunningServer(tiny_model_dir, root, static_engine=False)
    try:
        with pytest.raises(grpc.RpcError) as e:
            s.client.classify("Hello", adapter_id="t-cls")
        assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "static engine" in e.value.details()
    finally:
        s.close()


@pytest.mark.parametrize("meta,words", [
    ({"task": {"labels": ["a", "b"]}}, "3 outputs"),
    ({"task": {"labels": ["a", "a", "b"]}}, "distinct"),
    ({"task": {"kind": "qa"}}, "does not match"),
    ({"task": {"multi_label": "yes"}}, "multi_label"),
    ({"task": {"threshold": 2}}, "threshold"),
    ({"task": {"input": {"repeat": 1}}}, "repeat"),
])
def test_bad_head_metadata_fails_that_adapter_alone(srv, task_adapter_sources, meta, words):
    target = srv.registry.root / "t-bad"
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(task_adapter_sources / "t-cls", target)
    (target / "loraserve_metadata.json").write_text(json.dumps(meta))
    with pytest.raises(grpc.RpcError) as e:
        srv.client.classify("Hello", adapter_id="t-bad")
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION and words in e.value.details(), e.value.details()
    assert srv.client.classify("Hello", adapter_id="t-cls").labels
    assert any(a.adapter_id == "t-bad" for a in srv.client.list_adapters())
