"""Task adapters the trainer writes are PEFT's format: stock PEFT loads each kind (seq_cls single and
multi-label, token_cls, qa) onto the stock Transformers class and computes the logits the server serves
(Classify / Tag / Answer through a real channel), within 1e-4."""

from __future__ import annotations

import json

import pytest
import torch
from harness import RunningServer
from loraserve.core.lora.weights import CONFIG_FILE, WEIGHTS_FILE
from loraserve.core.tasks.answer import char_span, top_spans
from loraserve.core.tasks.inputs import classification_ids, qa_windows, tagging_input
from loraserve.core.tasks.words import split_words, word_spans_to_entities
from loraserve.server import tasks as server_tasks
from loraserve.trainer import synthetic
from loraserve.trainer.data import parse_records, prepare
from loraserve.trainer.loop import train_adapter
from loraserve.trainer.output import METADATA_FILE, write_trained_adapter
from loraserve.trainer.settings import TrainSettings
from safetensors.torch import load_file
from tiny_models import stock_task_model

ATOL = 1e-4
WINDOW = 128  # the server's max_prompt_tokens: QA contexts longer than this are read in windows
COMMON = {"rank": 4, "alpha": 8.0, "max_steps": 3, "batch_size": 4, "eval_fraction": 0.25, "learning_rate": 1e-2,
          "warmup_ratio": 0.0, "max_length": WINDOW}
# name: (kind, records, extra settings)
ADAPTERS = {
    "p-cls": ("seq_cls", lambda: synthetic.sentiment(24, seed=1), {}),
    "p-multi": ("seq_cls", lambda: synthetic.topics(24, seed=1), {"threshold": 0.4}),
    "p-tag": ("token_cls", lambda: synthetic.entities(24, seed=1), {}),
    "p-qa": ("qa", lambda: synthetic.squad(24, seed=1), {"doc_stride": 32, "max_answer_tokens": 20}),
}
# PEFT's own adapter_config.json for the kind (the stock-PEFT fixtures of tests/conftest.py).
PEFT_SOURCE = {"seq_cls": "t-cls", "token_cls": "t-tag", "qa": "t-qa"}


@pytest.fixture(scope="module")
def trained(fp32_model, tmp_path_factory):
    """Each adapter trained a few steps and written: {name: (dir, settings, result)}."""
    root = tmp_path_factory.mktemp("task-root")
    base = fp32_model.base
    out = {}
    for name, (kind, records, extra) in ADAPTERS.items():
        settings = TrainSettings(task=kind, **COMMON, **extra)
        data = prepare(parse_records(records(), kind=kind), base.tokenizer, settings, base.eos_token_ids)
        assert data.eval, name
        result = train_adapter(base, fp32_model.ctx, fp32_model.wrapped, settings, data)
        out[name] = (write_trained_adapter(root / name, result, settings, base), settings, result)
    return root, out


@pytest.fixture(scope="module")
def srv(tiny_model_dir, trained):
    s = RunningServer(tiny_model_dir, trained[0], max_prompt_tokens=WINDOW)
    yield s
    s.close()


@pytest.fixture(scope="module")
def tok(fp32_model):
    return fp32_model.base.tokenizer


_models: dict = {}


def peft_model(tiny_model_dir, adapter_dir, kind: str, num_labels: int):
    from peft import PeftModel

    key = str(adapter_dir)
    if key not in _models:
        _models[key] = PeftModel.from_pretrained(stock_task_model(tiny_model_dir, kind, num_labels), adapter_dir).eval()
    return _models[key]


def served_logits(srv, adapter_id: str, ids: list[int], kind: str) -> torch.Tensor:
    """The server engine's own head logits for one input (the numbers Classify/Tag/Answer decode)."""
    done = srv._call(server_tasks._head(srv.engine, srv.server.metrics, adapter_id, ids, kind, None))
    return done.head_logits


@pytest.mark.parametrize("name", list(ADAPTERS))
def test_files_are_peft_format_with_task_metadata(trained, task_adapter_sources, name):
    directory, settings, result = trained[1][name]
    kind = ADAPTERS[name][0]
    config = json.loads((directory / CONFIG_FILE).read_text())
    peft_config = json.loads((task_adapter_sources / PEFT_SOURCE[kind] / CONFIG_FILE).read_text())
    assert config["task_type"] == peft_config["task_type"] == {"seq_cls": "SEQ_CLS", "token_cls": "TOKEN_CLS",
                                                               "qa": "QUESTION_ANS"}[kind]
    assert sorted(config["modules_to_save"]) == sorted(peft_config["modules_to_save"]), \
        (config["modules_to_save"], peft_config["modules_to_save"])
    assert config["r"] == 4 and config["lora_alpha"] == 8.0

    tensors = load_file(str(directory / WEIGHTS_FILE))
    peft_keys = set(load_file(str(task_adapter_sources / PEFT_SOURCE[kind] / WEIGHTS_FILE)))
    head_keys = {k for k in tensors if "lora_" not in k}
    assert head_keys == {k for k in peft_keys if "lora_" not in k}, (head_keys, peft_keys)
    assert any(float(v.abs().max()) > 0 for k, v in tensors.items() if "lora_B" in k), "LoRA B untrained"
    if kind == "qa":  # PEFT's QA class names its decoder `transformer`
        assert all(k.startswith("base_model.model.transformer.") for k in tensors if "lora_" in k)

    meta = json.loads((directory / METADATA_FILE).read_text())
    task = meta["task"]
    assert task["kind"] == kind
    assert task["labels"] == list(result.task.labels)
    if name == "p-cls":
        assert task["labels"] == ["negative", "positive"] and task["multi_label"] is False
        assert task["input"] == {}
    elif name == "p-multi":
        assert task["multi_label"] is True and task["threshold"] == 0.4
        assert set(task["labels"]) <= set(synthetic.TOPICS) and len(task["labels"]) >= 2
    elif name == "p-tag":
        assert task["labels"][0] == "O" and all(t[:2] in ("B-", "I-") for t in task["labels"][1:])
        assert task["input"] == {"repeat": True}
    else:
        assert task["labels"] == ["start", "end"]
        assert task["input"] == {"doc_stride": 32, "max_answer_tokens": 20}
    assert "threshold" in task and "multi_label" in task
    assert meta["settings"]["task"] == kind
    evaluation = meta["evaluation"]
    want = {"p-cls": ("accuracy", "macro_f1", "confusion_matrix", "per_class"),
            "p-multi": ("micro_f1", "macro_f1", "subset_accuracy", "per_label"),
            "p-tag": ("entity_f1", "entity_precision", "entity_recall", "token_accuracy", "per_type"),
            "p-qa": ("exact_match", "f1")}[name]
    assert all(k in evaluation for k in want), sorted(evaluation)
    assert meta["metrics"]["eval_metrics"] and meta["metrics"]["steps"] == 3
    for key, value in meta["metrics"]["eval_metrics"].items():
        assert evaluation[key] == pytest.approx(value), key


TEXTS = ["The battery was not bad at all, and I would happily do it again.",
         "Shares of Lumen Networks fell after the election in Seoul.",
         "John Johnson flew from Rome to Vienna on Monday with Nova Robotics."]


@pytest.mark.parametrize("name", ["p-cls", "p-multi"])
def test_classify_serves_stock_peft_scores(srv, tok, trained, tiny_model_dir, name):
    directory, settings, result = trained[1][name]
    labels = list(result.task.labels)
    model = peft_model(tiny_model_dir, directory, "seq_cls", len(labels))
    for text in TEXTS:
        ids, _ = classification_ids(tok, text, WINDOW)
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids])).logits[0]
        served = served_logits(srv, name, ids, "seq_cls")[0]
        assert torch.allclose(served, logits, atol=ATOL), (served, logits)
        got = srv.client.classify(text, adapter_id=name)
        probs = logits.sigmoid() if name == "p-multi" else logits.softmax(-1)
        assert got.multi_label == (name == "p-multi")
        assert dict(got.labels) == pytest.approx({n: float(p) for n, p in zip(labels, probs)}, abs=ATOL)
        if name == "p-multi":
            assert sorted(got.predicted) == sorted(n for n, p in zip(labels, probs) if p >= 0.4)
        else:
            assert got.predicted == [labels[int(probs.argmax())]]
        assert got.prompt_tokens == len(ids)


def test_tag_serves_stock_peft_entities_from_the_second_copy(srv, tok, trained, tiny_model_dir):
    directory, settings, result = trained[1]["p-tag"]
    labels = list(result.task.labels)
    model = peft_model(tiny_model_dir, directory, "token_cls", len(labels))
    found = 0
    for text in TEXTS:
        words = split_words(text)
        inp = tagging_input(tok, [w for w, _, _ in words], True, WINDOW)  # the adapter records repeat: true
        half = (len(inp.input_ids) - 1) // 2
        assert all(t > half for t in inp.word_tokens)  # the second copy's positions
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([inp.input_ids])).logits[0]
        served = served_logits(srv, "p-tag", inp.input_ids, "token_cls")
        assert served.shape == logits.shape
        assert torch.allclose(served[inp.word_tokens], logits[inp.word_tokens], atol=ATOL)
        probs = logits[inp.word_tokens].softmax(-1)
        best, index = probs.max(-1)
        want = word_spans_to_entities(words, [labels[i] for i in index.tolist()], best.tolist(), text)
        got = srv.client.tag(text, adapter_id="p-tag")
        assert [(e.label, e.start, e.end, e.text) for e in got] == [(e.label, e.start, e.end, e.text) for e in want]
        assert [e.score for e in got] == pytest.approx([e.score for e in want], abs=ATOL)
        found += len(got)
    assert found, "no entity served: the comparison checked nothing but O tags"


def test_answer_serves_stock_peft_spans_across_windows(srv, tok, trained, tiny_model_dir):
    directory, settings, result = trained[1]["p-qa"]
    model = peft_model(tiny_model_dir, directory, "qa", 2)
    examples = synthetic.squad(2, seed=7, split="test")
    cases = [(examples[0]["question"], examples[0]["context"]),
             (examples[1]["question"], " ".join([examples[1]["context"], examples[0]["context"]]))]
    for question, context in cases:
        windows = qa_windows(tok, question, context, WINDOW, 32)
        spans: dict[tuple[int, int], float] = {}
        for w in windows:
            with torch.no_grad():
                out = model(input_ids=torch.tensor([w.input_ids]))
            logits = torch.stack([out.start_logits[0], out.end_logits[0]], -1)
            served = served_logits(srv, "p-qa", w.input_ids, "qa")
            assert torch.allclose(served, logits, atol=ATOL), (served - logits).abs().max()
            mask = torch.tensor([o is not None for o in w.offsets])
            for s, e, score in top_spans(logits[:, 0], logits[:, 1], mask, 20, 3):
                key = char_span(context, w.offsets, s, e)
                spans[key] = max(score, spans.get(key, 0.0))
        want = sorted(spans.items(), key=lambda kv: (-kv[1], kv[0]))[:3]
        got = srv.client.answer(question, context, adapter_id="p-qa", top_k=3)
        assert [(a.start, a.end) for a in got] == [k for k, _ in want]
        assert [a.score for a in got] == pytest.approx([v for _, v in want], abs=ATOL)
        assert all(context[a.start:a.end] == a.text for a in got)
    assert len(qa_windows(tok, *cases[1], WINDOW, 32)) >= 2  # the long context did take several windows
