"""Task data with integer class ids, as Hugging Face datasets export them (sst2's "label": 1,
conll2003's "ner_tags": [3, 0, 7]): with the `labels` setting each id is the name at its index and the
prepared data equals the same data written with names; without names a classification id is named by
its digits and integer tags are refused, naming the example."""

from __future__ import annotations

import pytest
from loraserve.core.errors import InvalidArgument
from loraserve.trainer.data import parse_records, prepare
from loraserve.trainer.settings import TrainSettings

SENT = ["negative", "positive"]
CONLL = ["O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC", "B-MISC", "I-MISC"]  # conll2003's order
WORDS = [["John", "Smith", "works", "at", "Acme", "in", "Paris", "."],
         ["EU", "rejects", "German", "call", "."],
         ["Nothing", "here", "."]]
TAGS = [[1, 2, 0, 0, 3, 0, 5, 0], [3, 0, 7, 0, 0], [0, 0, 0]]
TOPICS = ["sports", "politics", "weather"]


def prepared(records, tokenizer, **settings):
    s = TrainSettings(**{"eval_fraction": 0.5, "seed": 3, **settings})
    return prepare(parse_records(records, kind=s.task), tokenizer, s, eos_token_ids=[2])


def same_data(a, b):
    assert [(t.input_ids, t.target) for t in a.train + a.eval] == [(t.input_ids, t.target) for t in b.train + b.eval]
    assert a.task == b.task


def test_classification_ids_are_the_given_names(tokenizer):
    texts = ["A dull film.", "A lovely film.", "Boring.", "Great fun.", "Awful acting.", "Superb."]
    ids = [0, 1, 0, 1, 0, 1]
    by_id = prepared([{"text": t, "label": i} for t, i in zip(texts, ids)], tokenizer, task="seq_cls", labels=SENT)
    by_name = prepared([{"text": t, "label": SENT[i]} for t, i in zip(texts, ids)], tokenizer, task="seq_cls",
                       labels=SENT)
    same_data(by_id, by_name)
    assert by_id.task.labels == tuple(SENT)
    assert sorted(e.labels[0] for e in by_id.eval_examples) == sorted(e.labels[0] for e in by_name.eval_examples)
    assert all(e.labels[0] in SENT for e in by_id.eval_examples)


def test_classification_ids_without_names_are_named_by_their_digits(tokenizer):
    data = prepared([{"text": f"Text {i}.", "label": i % 3} for i in range(6)], tokenizer, task="seq_cls")
    assert data.task.labels == ("0", "1", "2")


def test_multi_label_ids_are_the_given_names(tokenizer):
    sets = [[0], [1, 2], [], [2], [0, 1], [1]]
    texts = [f"News item {i}." for i in range(len(sets))]
    by_id = prepared([{"text": t, "labels": s} for t, s in zip(texts, sets)], tokenizer, task="seq_cls",
                     labels=TOPICS)
    by_name = prepared([{"text": t, "labels": [TOPICS[i] for i in s]} for t, s in zip(texts, sets)], tokenizer,
                       task="seq_cls", labels=TOPICS)
    same_data(by_id, by_name)
    assert by_id.task.multi_label


def test_ner_tags_ids_are_the_given_tags(tokenizer):
    by_id = prepared([{"tokens": w, "ner_tags": t} for w, t in zip(WORDS, TAGS)], tokenizer, task="token_cls",
                     labels=CONLL)
    by_name = prepared([{"tokens": w, "tags": [CONLL[i] for i in t]} for w, t in zip(WORDS, TAGS)], tokenizer,
                       task="token_cls", labels=CONLL)
    same_data(by_id, by_name)
    assert by_id.task.labels == tuple(CONLL)
    assert all(set(e.tags) <= set(CONLL) for e in by_id.eval_examples)


@pytest.mark.parametrize("records, settings, message", [
    ([{"tokens": WORDS[0], "ner_tags": TAGS[0]}], {},
     "example 1: tag 0 is the integer 1: integer tags need the labels setting"),
    ([{"tokens": WORDS[0], "tags": TAGS[0]}, {"tokens": WORDS[1], "tags": [3, 0, 9, 0, 0]}], {"labels": CONLL},
     "example 2: tag 9 of word 2 is not an index of the 9 labels given"),
    ([{"tokens": WORDS[1], "tags": [3, 0, -1, 0, 0]}], {"labels": CONLL}, r"example 1: tag 2 \(-1\) is a negative"),
    ([{"tokens": WORDS[1], "tags": [3, 0, True, 0, 0]}], {"labels": CONLL},
     "example 1: field 'tags' must be an array of strings"),
    ([{"tokens": WORDS[1], "ner_tags": [3, 0]}], {"labels": CONLL}, "example 1: 5 tokens but 2 tags"),
])
def test_bad_tag_ids_name_the_example(tokenizer, records, settings, message):
    with pytest.raises(InvalidArgument, match=message):
        prepared(records * 2 if len(records) == 1 else records, tokenizer, task="token_cls", **settings)


@pytest.mark.parametrize("records, message", [
    ([{"text": "a", "label": 0}, {"text": "b", "label": 2}], "example 2: label 2 is not an index of the 2 labels"),
    ([{"text": "a", "labels": [0]}, {"text": "b", "labels": [1, "positive"]}], "example 2: labels must be distinct"),
    ([{"text": "a", "labels": [0]}, {"text": "b", "labels": [1.5]}], "example 2: field 'labels' must be an array"),
])
def test_bad_label_ids_name_the_example(tokenizer, records, message):
    with pytest.raises(InvalidArgument, match=message):
        prepared(records, tokenizer, task="seq_cls", labels=SENT)


def test_the_python_client_names_ids_as_the_server_does():
    from loraserve.training import train_request

    examples = [{"text": "Fine.", "label": 1}, {"text": "Bad.", "label": 0}, {"tokens": WORDS[1], "ner_tags": TAGS[1]},
                {"text": "News.", "labels": [2, 0]}]
    req = train_request("a", examples[:2], None, {"task": "seq_cls", "labels": SENT}, False, False)
    assert [e.label for e in req.examples] == ["positive", "negative"]
    req = train_request("a", examples[2:3], None, {"task": "token_cls", "labels": ",".join(CONLL)}, False, False)
    assert list(req.examples[0].tags) == ["B-ORG", "O", "B-MISC", "O", "O"]
    req = train_request("a", examples[3:], None, {"task": "seq_cls", "labels": TOPICS}, False, False)
    assert list(req.examples[0].labels) == ["weather", "sports"]
    req = train_request("a", examples[:1], None, {"task": "seq_cls"}, False, False)
    assert req.examples[0].label == "1"
    with pytest.raises(ValueError, match="integer tags need the labels setting"):
        train_request("a", examples[2:3], None, {"task": "token_cls"}, False, False)
