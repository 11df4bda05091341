"""Job records outlive the server: finished jobs are listed after a restart, jobs cut short by a
shutdown or a crash show as failed, and no half-written adapter is ever visible."""

from __future__ import annotations

import json

import grpc
import pytest
from harness import RunningServer
from loraserve.server.config import TrainingConfig
from loraserve.server.training.jobs import JOBS_DIR
from loraserve.server.training.records import new_job_id
from loraserve.training import Completed, Failed, Progress, Queued, Started

EXAMPLES = [{"prompt": f"Question {i}: the word?", "completion": "XYZZY"} for i in range(8)]
ENDLESS = {"max_steps": 100_000,  # the default --max-train-steps; hours on a CPU
           "batch_size": 2, "eval_fraction": 0.0, "template": "plain"}
SHUTDOWN = "interrupted: the server shut down before the job finished; submit it again"
RESTART = "interrupted by a server restart before it finished; submit it again"


def until(stream, predicate):
    seen = []
    for event in stream:
        seen.append(event)
        if predicate(event):
            return seen
    raise AssertionError(f"the stream ended early: {seen[-3:]}")


def fake_crash(root, jobs_dir) -> str:
    """What a killed server leaves: a running job's record and its half-written adapter directory."""
    job_id = new_job_id()
    record = {"format": 1, "job_id": job_id, "adapter_id": "crashed", "state": "running", "created_at": 1.7e9,
              "started_at": 1.7e9 + 1, "settings": {}, "overwrite": False, "dataset_path": None, "examples": 8,
              "data_sha256": "0" * 64}
    (jobs_dir / f"{job_id}.json").write_text(json.dumps(record))
    (jobs_dir / f".{job_id}.abc.tmp").write_text("{")  # a record save cut short
    partial = root / f".train-{job_id}"
    partial.mkdir()
    (partial / "adapter_config.json").write_text("{}")
    return job_id


def test_records_survive_a_restart(tiny_model_dir, tmp_path):
    root = tmp_path / "adapters"
    config = TrainingConfig(max_concurrent_jobs=1)
    first = RunningServer(tiny_model_dir, root, training=config)
    try:
        kept = list(first.client.train("kept", examples=EXAMPLES, settings={"max_steps": 2, "template": "plain"}))
        assert isinstance(kept[-1].kind, Completed)
        cut = first.client.train("cut", examples=EXAMPLES, settings=ENDLESS)
        cut_events = until(cut, lambda e: isinstance(e.kind, Progress) and e.kind.step >= 2)
        waiting = first.client.train("waiting", examples=EXAMPLES, settings=ENDLESS)
        assert next(waiting).kind == Queued(1)
        first._call(first.server.drain(grace=10))  # jobs end at once; their streams say why
        assert list(cut)[-1].kind == Failed(SHUTDOWN) and list(waiting)[-1].kind == Failed(SHUTDOWN)
    finally:
        first.close()

    crashed = fake_crash(root, root / JOBS_DIR)
    second = RunningServer(tiny_model_dir, root, training=config)
    try:
        jobs = {j.adapter_id: j for j in second.client.list_training_jobs()}
        assert [j.adapter_id for j in second.client.list_training_jobs()] == ["kept", "cut", "waiting", "crashed"]
        assert jobs["kept"].state == "succeeded" and jobs["kept"].metrics == kept[-1].kind.metrics
        assert jobs["kept"].progress == [e.kind for e in kept if isinstance(e.kind, Progress)][-1]
        assert (jobs["cut"].state, jobs["cut"].error) == ("failed", SHUTDOWN)
        assert jobs["cut"].progress.step >= cut_events[-1].kind.step
        assert (jobs["waiting"].state, jobs["waiting"].error, jobs["waiting"].started_at) == ("failed", SHUTDOWN, None)
        assert (jobs["crashed"].job_id, jobs["crashed"].state, jobs["crashed"].error) == (crashed, "failed", RESTART)
        assert second.metric("loraserve_training_jobs", state="failed") == 3

        # Only the finished adapter exists; the crashed job's partial directory is gone.
        assert [a.adapter_id for a in second.client.list_adapters()] == ["kept"]
        assert sorted(p.name for p in root.iterdir()) == [JOBS_DIR, "kept"]
        assert not [p for p in (root / JOBS_DIR).iterdir() if p.name.startswith(".")]
        assert second.client.predict("Hello", adapter_id="kept", max_new_tokens=4).generated_tokens >= 1

        replay = list(second.client.watch_training_job(jobs["kept"].job_id))
        assert [type(e.kind) for e in replay] == [Progress, Completed] and replay[-1] == kept[-1]
        assert [e.kind for e in second.client.watch_training_job(crashed)] == [Failed(RESTART)]
        with pytest.raises(grpc.RpcError) as e:
            second.client.cancel_training_job(crashed)
        assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        # The id of an interrupted job's adapter is free to train again.
        again = list(second.client.train("cut", examples=EXAMPLES, settings={"max_steps": 1, "template": "plain"}))
        assert isinstance(again[-1].kind, Completed)
    finally:
        second.close()


def test_draining_fails_running_jobs_at_once(tiny_model_dir, tmp_path):
    srv = RunningServer(tiny_model_dir, tmp_path / "adapters")
    try:
        stream = srv.client.train("drained", examples=EXAMPLES, settings=ENDLESS)
        until(stream, lambda e: isinstance(e.kind, Started))
        srv._call(srv.server.drain(grace=30))
        assert list(stream)[-1].kind == Failed(SHUTDOWN)  # well before the 30 s grace
        record = json.loads(next((tmp_path / "adapters" / JOBS_DIR).glob("*.json")).read_text())
        assert record["state"] == "failed" and record["error"] == SHUTDOWN
    finally:
        srv.close()
