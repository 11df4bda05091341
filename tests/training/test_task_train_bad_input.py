"""Bad task training data through the Train RPC: each is INVALID_ARGUMENT naming the example ("example N",
or "line N" of a dataset file) and what is wrong with it, refused before a job exists or the model runs,
while the server keeps serving the task adapters it has (and training good jobs)."""

from __future__ import annotations

import json

import grpc
import pytest
from harness import RunningServer, copy_adapters
from loraserve.server.config import TrainingConfig
from loraserve.trainer import synthetic
from loraserve.training import Completed

SENT = synthetic.sentiment(4, seed=11)
SENT_LABELS = ["negative", "positive"]
TAGGED = {"tokens": ["John", "Smith", "ran"], "tags": ["B-PER", "I-PER", "O"]}
TEXT = "John Smith went home"  # 20 characters
CONTEXT = "Acme was founded by John Smith."
QA_GOOD = {"context": CONTEXT, "question": "Who founded Acme?", "answers": {"text": ["John Smith"], "answer_start": [20]}}
SEQ, TOK, QA = {"task": "seq_cls"}, {"task": "token_cls"}, {"task": "qa"}


def qa(**fields):
    return {k: v for k, v in {**QA_GOOD, **fields}.items() if v is not None}


# case: (examples, settings, substrings of the refusal)
CASES = {
    "label outside the labels": ([*SENT[:2], {"text": "It was fine.", "label": "neutral"}],
                                 {**SEQ, "labels": SENT_LABELS},
                                 ["example 3: label 'neutral' is not in the label set (negative, positive)"]),
    "multi-label label outside the labels": ([{"text": "Goal!", "labels": ["sports"]},
                                              {"text": "Vote.", "labels": ["politics", "weather"]}],
                                             {**SEQ, "labels": ["sports", "politics"]},
                                             ["example 2: label 'weather' is not in the label set"]),
    "tag X-PER": ([TAGGED, {"tokens": ["John", "Smith"], "tags": ["X-PER", "O"]}], TOK,
                  ["example 2: tag 0 ('X-PER') is not O, B-<type> or I-<type>"]),
    "tag without its prefix": ([TAGGED, {"tokens": ["John", "Smith"], "tags": ["B-PER", "PER"]}], TOK,
                               ["example 2: tag 1 ('PER') is not O, B-<type> or I-<type>"]),
    "tag outside the labels": ([TAGGED, {"tokens": ["in", "Paris"], "tags": ["O", "B-LOC"]}],
                               {**TOK, "labels": ["O", "B-PER", "I-PER"]},
                               ["example 2: tag 'B-LOC' of word 1 is not in the label set"]),
    "labels that are not BIO tags": ([TAGGED], {**TOK, "labels": ["O", "PER"]},
                                     ["labels: tag 0 ('PER') is not O, B-<type> or I-<type>"]),
    "integer label beyond the labels": ([*SENT[:2], {"text": "It was fine.", "label": 2}], {**SEQ, "labels": SENT_LABELS},
                                        ["example 3: label '2' is not in the label set (negative, positive)"]),
    "tokens and tags of different lengths": ([TAGGED, {"tokens": ["a", "b", "c"], "tags": ["O", "O"]}], TOK,
                                             ["example 2: 3 tokens but 2 tags"]),
    "entity off word boundaries": ([TAGGED, {"text": TEXT, "entities": [{"start": 0, "end": 3, "label": "PER"}]}],
                                   TOK, ['example 2: entity 0 (0..3 "Joh") does not start and end on word boundaries']),
    "entity text not its span": ([TAGGED, {"text": TEXT, "entities": [{"start": 0, "end": 10, "label": "PER",
                                                                      "text": "John Smit"}]}], TOK,
                                 ['example 2: entity 0 (0..10) says its text is "John Smit", but the text there is '
                                  '"John Smith"']),
    "entity out of range": ([TAGGED, {"text": TEXT, "entities": [{"start": 5, "end": 99, "label": "PER"}]}], TOK,
                            ["example 2: entity 0 (5..99) is outside its text of 20 characters"]),
    "entities overlapping": ([TAGGED, {"text": TEXT, "entities": [{"start": 0, "end": 10, "label": "PER"},
                                                                  {"start": 5, "end": 10, "label": "PER"}]}], TOK,
                             ["example 2: entity 1 (5..10) overlaps entity 0 (0..10)"]),
    "answer not at its answer_start": ([QA_GOOD, qa(answers={"text": ["John Smith"], "answer_start": [3]})], QA,
                                       ["example 2: answer 0: the answer 'John Smith' is not found at answer_start 3",
                                        "it occurs at 20"]),
    "answer not in the context": ([QA_GOOD, qa(answers={"text": ["Jane Doe"], "answer_start": [20]})], QA,
                                  ["example 2: answer 0: the answer 'Jane Doe' is not found at answer_start 20",
                                   "does not occur in the context at all"]),
    "qa without context": ([QA_GOOD, qa(context=None)], QA, ["example 2: missing field 'context'"]),
    "qa without question": ([QA_GOOD, qa(question=None)], QA, ["example 2: missing field 'question'"]),
    "qa without answers": ([QA_GOOD, qa(answers=None)], QA, ["example 2: answers must be"]),
    "a set mixing label and labels": ([SENT[0], {"text": "Goal!", "labels": ["positive"]}], SEQ,
                                      ["example 2: mixes label and labels"]),
    "label and labels in one example": ([SENT[0], {"text": "Goal!", "label": "positive", "labels": ["positive"]}],
                                        SEQ, ["example 2: give label (one class) or labels (multi-label)"]),
    "a single class": ([{"text": f"Great thing {i}.", "label": "positive"} for i in range(4)], SEQ,
                       ["the data has 1 distinct label(s); classification needs at least 2"]),
    "a single given label": ([{"text": f"Great thing {i}.", "label": "positive"} for i in range(4)],
                             {**SEQ, "labels": ["positive"]}, ["labels: 1 label given", "at least 2"]),
    "a classification metric for a tagger": ([TAGGED], {**TOK, "metric_for_best_model": "accuracy"},
                                             ["metric_for_best_model 'accuracy' is not a token_cls metric",
                                              "entity_f1"]),
    "a tagging metric for a classifier": (SENT, {**SEQ, "metric_for_best_model": "entity_f1"},
                                          ["metric_for_best_model 'entity_f1' is not a seq_cls metric", "accuracy"]),
    "an unknown metric for qa": ([QA_GOOD], {**QA, "metric_for_best_model": "accuracy"},
                                 ["metric_for_best_model 'accuracy' is not a qa metric; one of: exact_match, f1"]),
    "labels for a qa task": ([QA_GOOD], {**QA, "labels": ["start", "end"]},
                             ["labels apply to seq_cls and token_cls adapters, not qa"]),
}
FILES = {  # line numbers count blank lines
    "tags.jsonl": [TAGGED, None, {"tokens": ["John", "Smith"], "tags": ["B-PER", "PER"]}],
    "squad.jsonl": [QA_GOOD, qa(answers={"text": ["John Smith"], "answer_start": [0]})],
    "ner_ids.jsonl": [{"tokens": ["John", "ran"], "ner_tags": [1, 0]}, {"tokens": ["in", "Paris"], "ner_tags": [0, 5]}],
    "label_ids.jsonl": [{"text": "Bad.", "label": 0}, {"text": "Good.", "label": 1}, {"text": "Meh.", "label": 2}],
}
FILE_CASES = {
    "tags.jsonl": (TOK, ["line 3: tag 1 ('PER') is not O, B-<type> or I-<type>"]),
    "squad.jsonl": (QA, ["line 2: answer 0: the answer 'John Smith' is not found at answer_start 0"]),
    "ner_ids.jsonl": (TOK, ["line 1: tag 0 is the integer 1: integer tags need the labels setting"]),
    "label_ids.jsonl": ({**SEQ, "labels": SENT_LABELS}, ["line 3: label 2 is not an index of the 2 labels given"]),
}


@pytest.fixture(scope="module")
def srv(tiny_model_dir, adapter_sources, task_adapter_sources, tmp_path_factory):
    data_root = tmp_path_factory.mktemp("data")
    for name, lines in FILES.items():
        (data_root / name).write_text("".join((json.dumps(x) if x is not None else "") + "\n" for x in lines))
    root = copy_adapters(adapter_sources, tmp_path_factory.mktemp("root"), names=("a0",))
    copy_adapters(task_adapter_sources, root, ("t-cls", "t-tag", "t-qa"))
    s = RunningServer(tiny_model_dir, root, training=TrainingConfig(data_root=str(data_root)))
    forwards = []
    layer = s.server.wrapped["model.layers.0.self_attn.q_proj"]
    hook = layer.register_forward_pre_hook(lambda m, args: forwards.append(1) if m.ctx.train is not None else None)
    s.training_forwards = forwards
    yield s
    hook.remove()
    s.close()


def refused(srv, **kwargs) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as e:
        next(srv.client.train("new-task", **kwargs))
    return e.value


def check_refusal(srv, error: grpc.RpcError, words: list[str]) -> None:
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (error.code(), error.details())
    for w in words:
        assert w in error.details(), (w, error.details())
    assert srv.client.list_training_jobs() == []
    assert srv.training_forwards == []
    # Everyone else is served as before.
    assert srv.client.classify("The food was lovely.", adapter_id="t-cls").labels
    srv.client.tag("John Smith flew to Paris.", adapter_id="t-tag")
    assert srv.client.answer("Who founded Acme?", CONTEXT, adapter_id="t-qa")
    assert srv.client.predict("Hello", adapter_id="a0", max_new_tokens=4).text is not None


@pytest.mark.parametrize("case", CASES)
def test_bad_task_examples_are_refused_by_name(srv, case):
    examples, settings, words = CASES[case]
    check_refusal(srv, refused(srv, examples=examples, settings={"max_steps": 1, **settings}), words)


@pytest.mark.parametrize("name", FILE_CASES)
def test_bad_task_lines_of_a_dataset_file_are_refused_by_line(srv, name):
    settings, words = FILE_CASES[name]
    check_refusal(srv, refused(srv, dataset_path=name, settings={"max_steps": 1, **settings}), words)


def test_good_task_jobs_still_train_after_the_refusals(srv):
    # Tagging labels given without O: O is every untagged word's label, so it is the head's first output.
    settings = {"task": "token_cls", "labels": ["B-PER", "I-PER"], "max_steps": 1, "batch_size": 2,
                "eval_fraction": 0.0}
    events = list(srv.client.train("good-tag", examples=[TAGGED, TAGGED], settings=settings))
    assert isinstance(events[-1].kind, Completed), events[-1]
    meta = json.loads((srv.registry.root / "good-tag" / "loraserve_metadata.json").read_text())
    assert meta["task"]["labels"] == ["O", "B-PER", "I-PER"]
    assert all(e.label == "PER" for e in srv.client.tag("John Smith ran", adapter_id="good-tag"))
    events = list(srv.client.train("good-cls", examples=SENT, settings={"task": "seq_cls", "max_steps": 1,
                                                                        "eval_fraction": 0.0}))
    assert isinstance(events[-1].kind, Completed), events[-1]
    assert {label for label, _ in srv.client.classify("Nice.", adapter_id="good-cls").labels} == set(SENT_LABELS)
