"""Faults while training: a full disk under a checkpoint or under the finished adapter, and a server
killed with SIGKILL mid-job. Nothing half-written is ever visible, and the killed job resumes."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest
import torch
from disk_faults import file_size_limit
from harness import RunningServer
from loraserve.client import Client
from loraserve.server.config import TrainingConfig
from loraserve.server.training.jobfiles import CHECKPOINT, EXAMPLES
from loraserve.server.training.jobs import JOBS_DIR
from loraserve.trainer.checkpoint import load_checkpoint
from loraserve.training import Completed, Failed, Progress
from safetensors.torch import load_file

EXAMPLES_ = [{"prompt": f"Question {i}: the word?", "completion": "XYZZY"} for i in range(8)]
ENDLESS = {"max_steps": 100_000, "batch_size": 2, "eval_fraction": 0.0, "template": "plain"}
ADAPTER_FILES = {"adapter_config.json", "adapter_model.safetensors", "loraserve_metadata.json"}


def until(stream, predicate):
    for event in stream:
        if predicate(event):
            return event
    raise AssertionError("the stream ended early")


def progressed(step: int):
    return lambda e: isinstance(e.kind, Progress) and e.kind.step >= step


def wait_for(condition, timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_a_checkpoint_that_cannot_be_written_keeps_the_last_one_and_training_goes_on(tiny_model_dir, tmp_path):
    root = tmp_path / "adapters"
    srv = RunningServer(tiny_model_dir, root, training=TrainingConfig(checkpoint_every_steps=1))
    try:
        stream = srv.client.train("full", examples=EXAMPLES_, settings=ENDLESS)
        job_id = until(stream, progressed(2)).job_id
        job = srv.server.training.job(job_id)
        record = lambda: srv.server.training.snapshot(job)  # noqa: E731
        path = root / JOBS_DIR / job_id / CHECKPOINT
        wait_for(lambda: record().checkpoint_step >= 2)
        # Far below a checkpoint's size, far above a record's: only checkpoints hit the "full disk".
        with file_size_limit(path.stat().st_size // 2):
            failures = record().checkpoint_failures
            wait_for(lambda: record().checkpoint_failures >= failures + 3)
            kept = load_checkpoint(path)  # whole, and the one the record names
            assert kept.step == record().checkpoint_step < record().progress.step
            assert sorted(p.name for p in path.parent.iterdir()) == [CHECKPOINT, EXAMPLES]  # no partial file
            assert record().state == "running"
        step = record().progress.step
        wait_for(lambda: record().checkpoint_step > step)  # the disk has room again: checkpoints resume
        assert load_checkpoint(path).step >= record().checkpoint_step
        srv.client.cancel_training_job(job_id)
        assert srv.metric("loraserve_training_checkpoints_total", outcome="failed") == record().checkpoint_failures
        assert srv.metric("loraserve_training_checkpoints_total", outcome="written") >= 3
        assert srv.client.get_training_job(job_id).checkpoint_failures == record().checkpoint_failures
    finally:
        srv.close()


def test_a_full_disk_under_the_finished_adapter_fails_the_job_and_leaves_nothing(tiny_model_dir, tmp_path):
    root = tmp_path / "adapters"
    srv = RunningServer(tiny_model_dir, root, training=TrainingConfig(checkpoint_every_steps=0))
    try:
        with file_size_limit(16 * 1024):  # the adapter's weights take 64 KiB; records and examples far less
            events = list(srv.client.train("nospace", examples=EXAMPLES_, settings={"max_steps": 2, "template": "plain"}))
        assert isinstance(events[-1].kind, Failed)
        assert events[-1].kind.reason.startswith("the adapter could not be written (")
        assert "File too large" in events[-1].kind.reason
        assert events[-1].kind.reason.endswith("); free space on the server and submit the job again")
        assert [p.name for p in root.iterdir()] == [JOBS_DIR]  # no adapter, no partial directory
        assert [a.adapter_id for a in srv.client.list_adapters()] == []
        assert all(p.is_file() for p in (root / JOBS_DIR).iterdir())  # the job's examples went with it
        # With room again the same job succeeds.
        again = list(srv.client.train("nospace", examples=EXAMPLES_, settings={"max_steps": 2, "template": "plain"}))
        assert isinstance(again[-1].kind, Completed)
        assert {p.name for p in (root / "nospace").iterdir()} == ADAPTER_FILES
    finally:
        srv.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model_dir, root: Path, data: Path, port: int, log: Path) -> subprocess.Popen:
    """`loraserve serve` in its own process, its log appended to `log`."""
    with open(log, "a") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "loraserve.server.cli", "serve", "--model", str(model_dir), "--quantization",
             "fp32", "--host", "127.0.0.1", "--port", str(port), "--metrics-port", "-1", "--adapter-root", str(root),
             "--data-root", str(data), "--checkpoint-every", "5", "--max-lora-rank", "8", "--max-gpu-adapters", "2"],
            stdout=out, stderr=subprocess.STDOUT, cwd=Path(__file__).resolve().parents[2])


def connect(proc: subprocess.Popen, port: int, log: Path) -> Client:
    client = Client(f"127.0.0.1:{port}")
    deadline = time.monotonic() + 120
    while True:
        assert proc.poll() is None, f"the server exited: {log.read_text()[-3000:]}"
        try:
            client.list_training_jobs()
            return client
        except grpc.RpcError:
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.2)


def visible_adapters_are_whole(root: Path, stop: threading.Event, bad: list) -> None:
    """Watch the adapter root: every directory under an adapter's name holds all of its files."""
    while not stop.is_set():
        for path in root.iterdir():
            if not path.name.startswith("."):
                try:
                    names = {p.name for p in path.iterdir()}
                except FileNotFoundError:
                    continue
                if names != ADAPTER_FILES:
                    bad.append((path.name, sorted(names)))
        time.sleep(0.002)


def test_a_job_killed_with_its_server_resumes_from_its_checkpoint(tiny_model_dir, tmp_path):
    root, data = tmp_path / "adapters", tmp_path / "data"
    root.mkdir()
    data.mkdir()
    (data / "train.jsonl").write_text("".join(json.dumps(e) + "\n" for e in EXAMPLES_))
    settings = {"max_steps": 40, "batch_size": 2, "dropout": 0.1, "eval_fraction": 0.25, "eval_steps": 10,
                "template": "plain"}
    stop, bad = threading.Event(), []
    watcher = threading.Thread(target=visible_adapters_are_whole, args=(root, stop, bad), daemon=True)
    watcher.start()
    port, log = free_port(), tmp_path / "server.log"
    proc = start_server(tiny_model_dir, root, data, port, log)
    try:
        with connect(proc, port, log) as client:
            stream = client.train("killed", dataset_path="train.jsonl", settings=settings)
            job_id = until(stream, progressed(12)).job_id
            proc.kill()  # SIGKILL: no drain, no last checkpoint
            proc.wait(30)
        state = load_checkpoint(root / JOBS_DIR / job_id / CHECKPOINT)
        assert state.step >= 10 and state.step % 5 == 0
        assert json.loads((root / JOBS_DIR / f"{job_id}.json").read_text())["state"] == "running"
        assert not (root / "killed").exists()

        port = free_port()  # not the killed server's: nothing may be left holding it
        proc = start_server(tiny_model_dir, root, data, port, log)
        with connect(proc, port, log) as client:
            events = list(client.watch_training_job(job_id))
            assert isinstance(events[-1].kind, Completed) and events[-1].kind.metrics.steps == 40
            assert [a.adapter_id for a in client.list_adapters()] == ["killed"]
            # The same job, never interrupted, on the same server: the same adapter, bit for bit.
            reference = list(client.train("reference", dataset_path="train.jsonl", settings=settings))
            assert isinstance(reference[-1].kind, Completed)
        record = json.loads((root / JOBS_DIR / f"{job_id}.json").read_text())
        assert record["state"] == "succeeded" and record["resumed_from_step"] == state.step
        want = load_file(root / "reference" / "adapter_model.safetensors")
        got = load_file(root / "killed" / "adapter_model.safetensors")
        assert want.keys() == got.keys() and all(torch.equal(got[k], want[k]) for k in want)
    finally:
        stop.set()
        watcher.join(10)
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
    assert bad == []
    assert not [p for p in root.iterdir() if p.name.startswith(".train-")]
    assert not [p for p in (root / JOBS_DIR).iterdir() if p.is_dir()]
    assert os.listdir(data) == ["train.jsonl"]
