"""The Node.js client (clients/node) against a real server: Predict, PredictStream, adapters, Train, errors.

Needs node and clients/node/node_modules (`npm ci --prefix clients/node`); .ci/run installs both, and
under CI=true a missing one fails the test instead of skipping it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from harness import RunningServer, copy_adapters

ROOT = Path(__file__).resolve().parents[2]
NODE_CLIENT = ROOT / "clients" / "node"
SCRIPT = Path(__file__).with_name("node_client_check.js")


def node_or_skip() -> str:
    node = shutil.which("node")
    missing = None
    if node is None:
        missing = "node is not installed"
    elif not (NODE_CLIENT / "node_modules" / "@grpc" / "grpc-js").is_dir():
        missing = "clients/node/node_modules is missing (npm ci --prefix clients/node)"
    if missing:
        if os.environ.get("CI"):
            pytest.fail(f"{missing}: .ci/run installs the Node client's dependencies")
        pytest.skip(missing)
    return node


@pytest.fixture(scope="module")
def result(tiny_model_dir, adapter_sources, tmp_path_factory):
    node = node_or_skip()
    root = copy_adapters(adapter_sources, tmp_path_factory.mktemp("node-adapters"))
    srv = RunningServer(tiny_model_dir, root, max_batch_size=4)
    try:
        run = subprocess.run([node, str(SCRIPT), srv.target], capture_output=True, text=True, timeout=240)
        assert run.returncode == 0, run.stderr
        out = json.loads(run.stdout)
        example = subprocess.run([node, str(NODE_CLIENT / "example.js"), srv.target], capture_output=True, text=True,
                                 timeout=120)
        out["example"] = (example.returncode, example.stdout + example.stderr)
        out["python_predict"] = srv.client.predict("Hello there", adapter_id="a0", max_new_tokens=8, seed=7).text
        out["requests_ok"] = srv.metric("loraserve_requests_total", method="Predict", code="OK")
        yield out
    finally:
        srv.close()


def test_list_and_get_adapters(result):
    # pageSize 2 over three adapters: the client followed next_page_token.
    assert sorted(a[0] for a in result["adapters"]) == ["a0", "a1", "a2"]
    assert all(state in ("disk", "cpu", "gpu") for _, state, _ in result["adapters"])
    a1 = result["getAdapter"]
    assert a1["adapterId"] == "a1" and a1["rank"] == 8 and a1["sizeBytes"] > 0 and a1["targetModules"]


def test_predict_matches_the_python_client(result):
    p = result["predict"]
    assert p["text"] == result["python_predict"]  # greedy, same adapter, same prompt
    assert p["finishReason"] in ("stop", "length") and 0 < p["generatedTokens"] <= 8
    assert p["promptTokens"] > 0 and p["totalSeconds"] > 0
    assert result["predictBase"]["generatedTokens"] <= 4
    assert result["requests_ok"] >= 2


def test_predict_stream_chunks_add_up(result):
    chunks = result["stream"]
    last = chunks[-1]
    assert last["finishReason"] in ("stop", "length")
    assert all("finishReason" not in c for c in chunks[:-1])
    assert "".join(c["text"] for c in chunks) == last["completion"]["text"] == result["predict"]["text"]
    assert result["earlyChunks"] == 2


def test_the_example_runs(result):
    rc, output = result["example"]
    assert rc == 0, output
    assert "adapters: a0 (" in output and "predict [a0]:" in output and "getAdapter(no-such-adapter): NOT_FOUND" in output


def test_errors_carry_the_right_status_codes(result):
    assert result["errors"] == {
        "unknownAdapter": "NOT_FOUND",
        "badId": "INVALID_ARGUMENT",
        "missingAdapter": "NOT_FOUND",
        "tooManyTokens": "INVALID_ARGUMENT",
        "deadline": "DEADLINE_EXCEEDED",
        "streamUnknown": "NOT_FOUND",
    }


def test_train_streams_events_and_registers_the_adapter(result):
    types = [e["type"] for e in result["train"]]
    assert types[-1] == "completed", result["train"]
    assert "started" in types and "progress" in types
    assert len({e["jobId"] for e in result["train"]}) == 1 and all(e["hasTime"] for e in result["train"])
    progress = [e["data"] for e in result["train"] if e["type"] == "progress"]
    assert progress[-1]["step"] == 2 and progress[-1]["loss"] > 0
    assert result["train"][-1]["data"]["adapterId"] == "node-trained"
    assert result["trained"]["adapterId"] == "node-trained" and result["trained"]["rank"] == 4
