"""`loraserve classify`, `tag` and `answer` against a live server: one JSON object on stdout, the same
result as the Python client's call, TEXT "-" read from stdin, and a refusal as `error: CODE: details`
on stderr with exit code 2."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
from harness import RunningServer, copy_adapters
from loraserve.server.cli import main

LORASERVE = str(Path(sys.executable).with_name("loraserve"))  # the installed console script
TEXT = "John Smith flew from Paris to Berlin on Monday."
QUESTION, CONTEXT = "Who founded Acme?", "Acme was founded in Paris by John Smith in 1990. It makes tools."


@pytest.fixture(scope="module")
def srv(tiny_model_dir, adapter_sources, task_adapter_sources, tmp_path_factory):
    root = copy_adapters(adapter_sources, tmp_path_factory.mktemp("root"), ("a0",))
    copy_adapters(task_adapter_sources, root, ("t-cls", "t-tag", "t-qa"))
    s = RunningServer(tiny_model_dir, root)
    yield s
    s.close()


def call(srv, capsys, *argv: str, stdin: str | None = None, monkeypatch=None) -> tuple[int, dict | None, str]:
    if stdin is not None:
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    code = main([argv[0], "--server", srv.target, *argv[1:]])
    out, err = capsys.readouterr()
    return code, (json.loads(out) if code == 0 else None), err


def test_classify_prints_the_clients_labels(srv, capsys, monkeypatch):
    code, got, err = call(srv, capsys, "classify", "--adapter", "t-cls", TEXT)
    assert code == 0, err
    want = srv.client.classify(TEXT, adapter_id="t-cls")
    assert got == {"labels": [{"label": label, "probability": pytest.approx(p, abs=1e-6)} for label, p in want.labels],
                   "predicted": want.predicted, "multi_label": False, "prompt_tokens": want.prompt_tokens}
    code, top, err = call(srv, capsys, "classify", "--adapter", "t-cls", "--top-k", "2", "-", stdin=TEXT + "\n",
                          monkeypatch=monkeypatch)
    assert code == 0, err
    assert top["labels"] == got["labels"][:2]  # stdin's trailing newline is dropped: the same text


def test_tag_prints_entities_with_offsets_into_the_text(srv, capsys, monkeypatch):
    code, got, err = call(srv, capsys, "tag", "--adapter", "t-tag", "-", stdin=TEXT, monkeypatch=monkeypatch)
    assert code == 0, err
    want = srv.client.tag(TEXT, adapter_id="t-tag")
    assert [(e["label"], e["start"], e["end"], e["text"]) for e in got["entities"]] == \
        [(e.label, e.start, e.end, e.text) for e in want]
    for e in got["entities"]:
        assert TEXT[e["start"]:e["end"]] == e["text"] and e["label"] in ("PER", "LOC") and 0 < e["score"] <= 1


def test_answer_prints_spans_of_the_context(srv, capsys, monkeypatch):
    code, got, err = call(srv, capsys, "answer", "--adapter", "t-qa", "--question", QUESTION, "--context", "-",
                          "--top-k", "3", stdin=CONTEXT + "\n", monkeypatch=monkeypatch)
    assert code == 0, err
    want = srv.client.answer(QUESTION, CONTEXT, adapter_id="t-qa", top_k=3)
    assert [(a["start"], a["end"], a["text"]) for a in got["answers"]] == [(a.start, a.end, a.text) for a in want]
    assert 1 <= len(got["answers"]) <= 3
    for a in got["answers"]:
        assert CONTEXT[a["start"]:a["end"]] == a["text"] and 0 < a["score"] <= 1


@pytest.mark.parametrize("argv, code_name, words", [
    (("classify", "--adapter", "nope", "Hello"), "NOT_FOUND", "nope"),
    (("tag", "--adapter", "t-cls", "Hello"), "FAILED_PRECONDITION", "seq_cls"),
    (("classify", "--adapter", "a0", "Hello"), "FAILED_PRECONDITION", "Predict"),
    (("answer", "--adapter", "t-qa", "--question", "Who?", "--context", ""), "INVALID_ARGUMENT", "context"),
])
def test_refusals_print_the_status_and_exit_2(srv, capsys, argv, code_name, words):
    code, _, err = call(srv, capsys, *argv)
    assert code == 2
    prefix = f"loraserve {argv[0]}: error: {code_name}: "
    assert err.startswith(prefix) and words in err, err


def test_stdin_for_two_inputs_and_a_bad_flag_exit_2(srv, capsys, monkeypatch):
    code, _, err = call(srv, capsys, "answer", "--adapter", "t-qa", "--question", "-", "--context", "-",
                        stdin="x", monkeypatch=monkeypatch)
    assert code == 2 and 'only one of the inputs can be "-"' in err
    code, _, err = call(srv, capsys, "classify", "--adapter", "t-cls", "--tls-ca", "/no/such/ca.pem", "Hi")
    assert code == 2 and "loraserve classify: error:" in err and "/no/such/ca.pem" in err


def test_the_console_script_without_torch(srv):
    # The commands are light: a shell loop calling them does not pay for importing torch.
    code = ("import sys; from loraserve.server.cli import main; rc = main(sys.argv[1:]); "
            "assert 'torch' not in sys.modules, 'torch imported'; sys.exit(rc)")
    result = subprocess.run([sys.executable, "-c", code, "classify", "--server", srv.target, "--adapter", "t-cls",
                             "Hello there"], check=False, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert json.loads(result.stdout)["predicted"][0].startswith("LABEL_")
    result = subprocess.run([LORASERVE, "tag", "--server", srv.target, "--adapter", "nope", "Hello"],
                            check=False, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stderr.startswith("loraserve tag: error: NOT_FOUND: "), result.stderr
