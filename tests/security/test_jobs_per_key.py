"""One API key cannot fill the training queue for the others: --max-jobs-per-key counts the jobs each key
has queued or running; the job records which key submitted it, across a restart."""

from __future__ import annotations

import grpc
import pytest
from harness import RunningServer
from loraserve.client import Client
from loraserve.server.api_keys import key_line, new_key, parse_scopes
from loraserve.server.config import SecurityConfig, TrainingConfig
from loraserve.training import Queued

EXAMPLES = [{"prompt": f"Question {i}?", "completion": "XYZZY"} for i in range(8)]
ENDLESS = {"max_steps": 100_000, "batch_size": 2, "eval_fraction": 0.0, "template": "plain"}
KEYS = {"alice": new_key(), "bob": new_key()}


def test_a_key_at_its_cap_is_refused_while_others_still_submit(tiny_model_dir, tmp_path):
    keys = tmp_path / "api-keys"
    keys.write_text("".join(key_line(k, name, parse_scopes("training")) + "\n" for name, k in KEYS.items()))
    srv = RunningServer(tiny_model_dir, tmp_path / "root", security=SecurityConfig(api_keys_file=str(keys)),
                        training=TrainingConfig(max_concurrent_jobs=1, max_jobs_per_key=2),
                        connect={"api_key": KEYS["alice"]})
    bob = Client(srv.target, api_key=KEYS["bob"])
    try:
        alice = srv.client
        started = [next(iter(alice.train(f"alice-{i}", examples=EXAMPLES, settings=ENDLESS))) for i in range(2)]
        assert all(isinstance(e.kind, Queued) for e in started)
        with pytest.raises(grpc.RpcError) as e:
            next(iter(alice.train("alice-2", examples=EXAMPLES, settings=ENDLESS)))
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "'alice'" in e.value.details() and "--max-jobs-per-key 2" in e.value.details()
        assert isinstance(next(iter(bob.train("bob-0", examples=EXAMPLES, settings=ENDLESS))).kind, Queued)

        # A job that ends frees its place.
        alice.cancel_training_job(started[0].job_id)
        assert isinstance(next(iter(alice.train("alice-2", examples=EXAMPLES, settings=ENDLESS))).kind, Queued)
        owners = {j.adapter_id: srv.server.training.job(j.job_id).record.owner for j in alice.list_training_jobs()}
        assert owners == {"alice-0": "alice", "alice-1": "alice", "bob-0": "bob", "alice-2": "alice"}
        for job in alice.list_training_jobs():
            if job.state in ("queued", "running"):
                alice.cancel_training_job(job.job_id)
    finally:
        bob.close()
        srv.close()


def test_without_keys_only_the_queue_bounds_jobs(tiny_model_dir, tmp_path):
    srv = RunningServer(tiny_model_dir, tmp_path / "root",
                        training=TrainingConfig(max_concurrent_jobs=1, max_jobs_per_key=1))
    try:
        ids = [next(iter(srv.client.train(f"job-{i}", examples=EXAMPLES, settings=ENDLESS))).job_id for i in range(3)]
        assert all(srv.server.training.job(i).record.owner is None for i in ids)
        for job_id in ids:
            srv.client.cancel_training_job(job_id)
    finally:
        srv.close()
