"""Task adapters through the Train RPC (a real channel): one job of each kind (seq_cls single and
multi-label, token_cls, qa) streams evaluations with its kind's metrics, completes with them, keeps its
settings in the job record, and serves at once through Classify / Tag / Answer. Early stopping follows
metric_for_best_model and keeps the adapter that evaluated best."""

from __future__ import annotations

import json
import math

import pytest
from harness import RunningServer
from loraserve.server.config import TrainingConfig
from loraserve.trainer import synthetic
from loraserve.trainer.data import split_indices
from loraserve.training import Completed, Evaluation, Progress, Queued, Started

SMALL = {"rank": 4, "alpha": 8.0, "max_steps": 3, "batch_size": 4, "eval_fraction": 0.25, "eval_steps": 2,
         "learning_rate": 1e-2, "warmup_ratio": 0.0, "max_length": 128}
SENTIMENT = ["negative", "positive"]
# name: (settings, examples, metrics every evaluation carries)
JOBS = {
    "r-cls": ({"task": "seq_cls", "labels": SENTIMENT, "metric_for_best_model": "macro_f1"},
              synthetic.sentiment(24, seed=3), ("accuracy", "macro_f1")),
    "r-multi": ({"task": "seq_cls", "threshold": 0.4, "metric_for_best_model": "micro_f1"},
                synthetic.topics(24, seed=3), ("micro_f1", "macro_f1", "subset_accuracy")),
    "r-tag": ({"task": "token_cls", "metric_for_best_model": "entity_f1"},
              synthetic.entities(12, seed=3) + synthetic.entities(12, seed=4, format="text"),
              ("entity_f1", "entity_precision", "entity_recall", "token_accuracy")),
    "r-qa": ({"task": "qa", "doc_stride": 32, "max_answer_tokens": 20, "metric_for_best_model": "exact_match"},
             synthetic.squad(24, seed=3), ("exact_match", "f1")),
}


@pytest.fixture(scope="module")
def srv(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("root")
    s = RunningServer(tiny_model_dir, root, training=TrainingConfig(max_concurrent_jobs=1))
    yield s
    s.close()


def check_stream(events, adapter_id, metric_names, steps):
    kinds = [type(e.kind) for e in events]
    assert kinds[0] is Queued and kinds[1] is Started and kinds[-1] is Completed, kinds
    assert len({e.job_id for e in events}) == 1
    assert [e.kind.step for e in events if isinstance(e.kind, Progress)] == list(range(1, steps + 1))
    evaluations = [e.kind for e in events if isinstance(e.kind, Evaluation)]
    assert evaluations, kinds
    for ev in evaluations:
        assert all(name in ev.metrics for name in metric_names), (adapter_id, sorted(ev.metrics))
        assert all(0.0 <= ev.metrics[name] <= 1.0 for name in metric_names), ev.metrics
        assert ev.eval_loss > 0
    done = events[-1].kind
    assert done.adapter_id == adapter_id and done.metrics.steps == steps
    assert all(name in done.metrics.eval_metrics for name in metric_names), sorted(done.metrics.eval_metrics)
    assert done.metrics.eval_loss is not None
    return evaluations, done


@pytest.mark.parametrize("name", list(JOBS))
def test_each_kind_trains_reports_its_metrics_and_serves_at_once(srv, name):
    settings, examples, metric_names = JOBS[name]
    events = list(srv.client.train(name, examples=examples, settings={**SMALL, **settings}))
    evaluations, done = check_stream(events, name, metric_names, SMALL["max_steps"])
    assert [ev.step for ev in evaluations] == [2, 3]
    # Without early stopping the last evaluation is the adapter kept.
    assert done.metrics.eval_metrics == pytest.approx(evaluations[-1].metrics)
    assert done.metrics.eval_loss == pytest.approx(evaluations[-1].eval_loss)

    job = srv.client.get_training_job(events[0].job_id)
    assert job.state == "succeeded" and job.examples == len(examples)
    assert job.settings["task"] == settings["task"]
    assert job.settings["metric_for_best_model"] == settings["metric_for_best_model"]
    assert job.settings["rank"] == 4 and job.settings["max_steps"] == 3
    if "labels" in settings:
        assert job.settings["labels"] == settings["labels"]
    if name == "r-multi":
        assert job.settings["threshold"] == pytest.approx(0.4)
    if name == "r-qa":
        assert job.settings["doc_stride"] == 32 and job.settings["max_answer_tokens"] == 20
    assert job.metrics.eval_metrics == pytest.approx(done.metrics.eval_metrics)

    meta = json.loads((srv.registry.root / name / "loraserve_metadata.json").read_text())
    assert meta["task"]["kind"] == settings["task"]
    assert all(k in meta["evaluation"] for k in metric_names)

    # Served at once, no LoadAdapter call.
    if settings["task"] == "seq_cls":
        got = srv.client.classify(examples[0]["text"], adapter_id=name)
        assert got.multi_label == (name == "r-multi")
        if name == "r-cls":
            assert sorted(label for label, _ in got.labels) == SENTIMENT and len(got.predicted) == 1
        else:
            assert {label for label, _ in got.labels} <= set(synthetic.TOPICS)
            assert all(p >= 0.4 for label, p in got.labels if label in got.predicted)
    elif settings["task"] == "token_cls":
        text = examples[-1]["text"]
        entities = srv.client.tag(text, adapter_id=name)
        assert all(text[e.start:e.end] == e.text and e.label in ("PER", "LOC", "ORG", "MISC") for e in entities)
    else:
        q = synthetic.squad(1, seed=9, split="test")[0]
        answers = srv.client.answer(q["question"], q["context"], adapter_id=name, top_k=2)
        assert 1 <= len(answers) <= 2 and all(q["context"][a.start:a.end] == a.text for a in answers)
    adapter = srv.client.get_adapter(name)
    assert adapter.task_type == {"seq_cls": "SEQ_CLS", "token_cls": "TOKEN_CLS", "qa": "QUESTION_ANS"}[settings["task"]]


def test_early_stopping_follows_the_metric_and_keeps_the_best(srv):
    examples = synthetic.sentiment(32, seed=5)
    settings = {**SMALL, "task": "seq_cls", "max_steps": 8, "eval_steps": 1, "early_stopping_patience": 1,
                "metric_for_best_model": "accuracy", "learning_rate": 3e-2, "seed": 7}
    events = list(srv.client.train("r-early", examples=examples, settings=settings))
    evaluations = [e.kind for e in events if isinstance(e.kind, Evaluation)]
    done = events[-1].kind
    assert isinstance(done, Completed), events[-1]
    scores = [ev.metrics["accuracy"] for ev in evaluations]
    # Accuracy over 8 held-out texts takes 9 values, so 8 evaluations that each beat all before them
    # cannot happen from any start above 1/8: with patience 1 the run stops at the first miss.
    first_miss = next((i for i in range(1, len(scores)) if scores[i] <= max(scores[:i])), None)
    assert first_miss is not None and len(evaluations) == first_miss + 1, scores
    assert done.metrics.stopped_early and done.metrics.steps == first_miss + 1 < 8, (scores, done.metrics)
    # The kept adapter is the earliest of the best, never the last (which did not beat it); a tie in
    # accuracy still leaves two different adapters, told apart by their eval loss.
    best = max(range(len(scores)), key=lambda i: (scores[i], -i))
    assert best < len(scores) - 1
    assert done.metrics.eval_metrics == pytest.approx(evaluations[best].metrics)
    assert done.metrics.eval_loss == pytest.approx(evaluations[best].eval_loss)
    best_loss, last_loss = evaluations[best].eval_loss, evaluations[-1].eval_loss
    assert abs(best_loss - last_loss) > 0.01 * best_loss, (best_loss, last_loss)

    job = srv.client.get_training_job(events[0].job_id)
    assert job.settings["metric_for_best_model"] == "accuracy" and job.settings["early_stopping_patience"] == 1
    assert job.metrics.stopped_early == done.metrics.stopped_early

    # The adapter served is the best one: on the held-out split it scores the best accuracy, and its
    # probabilities give the best evaluation's loss (mean cross-entropy), not the last one's.
    _, held_out = split_indices(len(examples), settings["eval_fraction"], settings["seed"])
    served = [(dict(got.labels), got.predicted, examples[i]["label"])
              for i in held_out for got in [srv.client.classify(examples[i]["text"], adapter_id="r-early")]]
    right = sum(predicted == [label] for _, predicted, label in served)
    assert right / len(held_out) == pytest.approx(scores[best]), (right, len(held_out), scores)
    loss = -sum(math.log(probs[label]) for probs, _, label in served) / len(served)
    assert loss == pytest.approx(best_loss, rel=1e-3), (loss, best_loss, last_loss)
