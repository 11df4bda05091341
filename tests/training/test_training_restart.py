"""Jobs outlive the server: a drain suspends running jobs with a checkpoint and keeps queued ones,
the next start resumes them, and a resumed job ends with exactly the adapter of a run that never
stopped. Finished jobs are listed after a restart; no half-written adapter is ever visible."""

from __future__ import annotations

import json

import grpc
import pytest
import torch
from harness import RunningServer
from loraserve.server.config import TrainingConfig
from loraserve.server.training.jobfiles import CHECKPOINT, EXAMPLES
from loraserve.server.training.jobs import JOBS_DIR, NO_EXAMPLES, RESUME_FAILED
from loraserve.server.training.records import new_job_id
from loraserve.trainer.checkpoint import load_checkpoint
from loraserve.training import Cancelled, Completed, Failed, Progress, Queued, Started
from safetensors.torch import load_file

EXAMPLES_ = [{"prompt": f"Question {i}: the word?", "completion": "XYZZY"} for i in range(8)]
ENDLESS = {"max_steps": 100_000,  # the default --max-train-steps; hours on a CPU
           "batch_size": 2, "eval_fraction": 0.0, "template": "plain"}
SHUTDOWN = "the server is shutting down; "


def until(stream, predicate):
    seen = []
    for event in stream:
        seen.append(event)
        if predicate(event):
            return seen
    raise AssertionError(f"the stream ended early: {seen[-3:]}")


def progressed(step: int):
    return lambda e: isinstance(e.kind, Progress) and e.kind.step >= step


def record_of(root, job_id) -> dict:
    return json.loads((root / JOBS_DIR / f"{job_id}.json").read_text())


def interrupted(stream) -> str:
    """The message of a stream that a drain ended (UNAVAILABLE: the job goes on after the restart)."""
    with pytest.raises(grpc.RpcError) as e:
        list(stream)
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    return e.value.details()


def older_servers_crash(root) -> str:
    """What a killed server of an older version leaves: a running job's record without its inline
    examples, a record save cut short, and a half-written adapter directory."""
    job_id = new_job_id()
    record = {"format": 1, "job_id": job_id, "adapter_id": "crashed", "state": "running", "created_at": 1.7e9,
              "started_at": 1.7e9 + 1, "settings": {}, "overwrite": False, "dataset_path": None, "examples": 8,
              "data_sha256": "0" * 64}
    (root / JOBS_DIR / f"{job_id}.json").write_text(json.dumps(record))
    (root / JOBS_DIR / f".{job_id}.abc.tmp").write_text("{")
    partial = root / f".train-{job_id}"
    partial.mkdir()
    (partial / "adapter_config.json").write_text("{}")
    return job_id


def test_a_drained_server_resumes_its_jobs_on_the_next_start(tiny_model_dir, tmp_path):
    root = tmp_path / "adapters"
    config = TrainingConfig(max_concurrent_jobs=1, checkpoint_every_steps=2)
    first = RunningServer(tiny_model_dir, root, training=config)
    try:
        kept = list(first.client.train("kept", examples=EXAMPLES_, settings={"max_steps": 2, "template": "plain"}))
        assert isinstance(kept[-1].kind, Completed)
        cut = first.client.train("cut", examples=EXAMPLES_, settings=ENDLESS)
        cut_id = until(cut, progressed(3))[0].job_id
        waiting = first.client.train("waiting", examples=EXAMPLES_, settings=ENDLESS)
        first_event = next(waiting)
        waiting_id = first_event.job_id
        assert first_event.kind == Queued(1)
        first._call(first.server.drain(grace=10))  # running jobs stop at once; their streams say when they go on
        assert interrupted(cut).startswith(f"{SHUTDOWN}job {cut_id} resumes from step ")
        assert interrupted(waiting) == (f"{SHUTDOWN}job {waiting_id} stays queued and starts when the server is "
                                        "back (WatchTrainingJob re-attaches)")
    finally:
        first.close()
    suspended = record_of(root, cut_id)
    step = suspended["checkpoint_step"]
    assert suspended["state"] == "running" and step >= 3 and suspended["progress"]["step"] == step
    assert load_checkpoint(root / JOBS_DIR / cut_id / CHECKPOINT).step == step
    assert record_of(root, waiting_id)["state"] == "queued"

    crashed = older_servers_crash(root)
    second = RunningServer(tiny_model_dir, root, training=config)
    try:
        jobs = {j.adapter_id: j for j in second.client.list_training_jobs()}
        assert list(jobs) == ["kept", "cut", "waiting", "crashed"]
        assert jobs["kept"].state == "succeeded" and jobs["kept"].metrics == kept[-1].kind.metrics
        assert jobs["cut"].state == "running" and jobs["cut"].started_at == suspended["started_at"]
        assert (jobs["waiting"].state, jobs["waiting"].queue_position, jobs["waiting"].started_at) == ("queued", 1, None)
        assert (jobs["crashed"].state, jobs["crashed"].error) == ("failed", f"{RESUME_FAILED}: {NO_EXAMPLES}")

        # The cut job goes on from its checkpoint: its stream replays its last progress, then resumes.
        watch = second.client.watch_training_job(cut_id)
        seen = until(watch, progressed(step + 1))
        assert seen[0].kind.step == step and isinstance(seen[1].kind, Started) and seen[-1].kind.step == step + 1
        assert record_of(root, cut_id)["resumed_from_step"] == step
        seen_by_client = second.client.get_training_job(cut_id)  # the resume state is part of the contract
        assert seen_by_client.resumed_from_step == step and seen_by_client.checkpoint_step >= step
        assert second.client.get_training_job(waiting_id).resumed_from_step is None
        assert second.metric("loraserve_training_jobs", state="running") == 1

        assert second.client.cancel_training_job(cut_id).state == "cancelled"
        assert isinstance(list(watch)[-1].kind, Cancelled)
        until(second.client.watch_training_job(waiting_id), lambda e: isinstance(e.kind, Started))
        assert record_of(root, waiting_id)["resumed_from_step"] is None  # it had never started
        assert second.client.cancel_training_job(waiting_id).state == "cancelled"

        # Only the finished adapter exists; a finished job keeps no files, a crash's partial files are gone.
        assert [a.adapter_id for a in second.client.list_adapters()] == ["kept"]
        assert sorted(p.name for p in root.iterdir()) == [JOBS_DIR, "kept"]
        assert all(p.suffix == ".json" and not p.name.startswith(".") for p in (root / JOBS_DIR).iterdir())
        assert second.client.predict("Hello", adapter_id="kept", max_new_tokens=4).generated_tokens >= 1

        replay = list(second.client.watch_training_job(jobs["kept"].job_id))
        assert [type(e.kind) for e in replay] == [Progress, Completed] and replay[-1] == kept[-1]
        assert [e.kind for e in second.client.watch_training_job(crashed)] == [Failed(f"{RESUME_FAILED}: {NO_EXAMPLES}")]
        with pytest.raises(grpc.RpcError) as e:
            second.client.cancel_training_job(crashed)
        assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    finally:
        second.close()


def test_a_resumed_job_makes_the_adapter_of_an_uninterrupted_one(tiny_model_dir, tmp_path):
    # Dropout, accumulation, warmup, several epochs and evaluations: all of it must resume exactly.
    settings = {"max_steps": 40, "batch_size": 2, "gradient_accumulation_steps": 2, "dropout": 0.1,
                "eval_fraction": 0.25, "eval_steps": 5, "warmup_ratio": 0.1, "template": "plain", "seed": 3}
    root = tmp_path / "adapters"
    config = TrainingConfig(checkpoint_every_steps=4)
    first = RunningServer(tiny_model_dir, root, training=config)
    try:
        reference = list(first.client.train("reference", examples=EXAMPLES_, settings=settings))
        stream = first.client.train("resumed", examples=EXAMPLES_, settings=settings)
        job_id = until(stream, progressed(6))[0].job_id
        first._call(first.server.drain(grace=10))
        interrupted(stream)
        assert not (root / "resumed").exists()
    finally:
        first.close()
    step = record_of(root, job_id)["checkpoint_step"]
    assert 6 <= step < 40

    second = RunningServer(tiny_model_dir, root, training=config)
    try:
        resumed = list(second.client.watch_training_job(job_id))
    finally:
        second.close()
    assert isinstance(resumed[-1].kind, Completed) and record_of(root, job_id)["resumed_from_step"] == step
    want, got = reference[-1].kind.metrics, resumed[-1].kind.metrics
    timing = ("seconds", "tokens_per_second")
    assert {k: v for k, v in vars(got).items() if k not in timing} == {k: v for k, v in vars(want).items()
                                                                       if k not in timing}
    # Bit for bit: fp32 on a CPU, the same batches in the same order, the same dropout masks.
    want = load_file(root / "reference" / "adapter_model.safetensors")
    got = load_file(root / "resumed" / "adapter_model.safetensors")
    assert want.keys() == got.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert not (root / JOBS_DIR / job_id).exists()  # the checkpoint goes with the finished job


def test_draining_suspends_running_jobs_at_once(tiny_model_dir, tmp_path):
    root = tmp_path / "adapters"
    srv = RunningServer(tiny_model_dir, root, training=TrainingConfig(checkpoint_every_steps=0))
    try:
        stream = srv.client.train("drained", examples=EXAMPLES_, settings=ENDLESS)
        job_id = until(stream, progressed(1))[0].job_id
        srv._call(srv.server.drain(grace=30))
        assert interrupted(stream).startswith(f"{SHUTDOWN}job {job_id} resumes from step ")  # well before 30 s
        record = record_of(root, job_id)
        # With no checkpoints on a schedule, the drain's own is the only one.
        assert record["state"] == "running" and record["checkpoint_step"] == record["progress"]["step"]
        assert load_checkpoint(root / JOBS_DIR / job_id / CHECKPOINT).step == record["checkpoint_step"]
        assert [json.loads(line) for line in (root / JOBS_DIR / job_id / EXAMPLES).read_text().splitlines()] == \
            EXAMPLES_
    finally:
        srv.close()


def test_a_data_file_changed_while_the_server_was_down_fails_the_job(tiny_model_dir, tmp_path):
    root, data = tmp_path / "adapters", tmp_path / "data"
    data.mkdir()
    (data / "train.jsonl").write_text("".join(json.dumps(e) + "\n" for e in EXAMPLES_))
    config = TrainingConfig(data_root=str(data))
    first = RunningServer(tiny_model_dir, root, training=config)
    try:
        stream = first.client.train("changed", dataset_path="train.jsonl", settings=ENDLESS)
        job_id = until(stream, progressed(1))[0].job_id
        first._call(first.server.drain(grace=10))
        interrupted(stream)
    finally:
        first.close()
    assert not (root / JOBS_DIR / job_id / EXAMPLES).exists()  # a data file is read again, not copied
    with open(data / "train.jsonl", "a") as f:
        f.write(json.dumps({"prompt": "one more", "completion": "example"}) + "\n")
    second = RunningServer(tiny_model_dir, root, training=config)
    try:
        events = list(second.client.watch_training_job(job_id))
    finally:
        second.close()
    assert events[-1].kind == Failed(f"{RESUME_FAILED}: dataset_path 'train.jsonl' changed since the job was "
                                     "submitted (sha256 differs); submit the job again")


def test_a_job_killed_after_installing_its_adapter_is_not_trained_again(tiny_model_dir, tmp_path):
    root = tmp_path / "adapters"
    first = RunningServer(tiny_model_dir, root)
    try:
        done = list(first.client.train("installed", examples=EXAMPLES_, settings={"max_steps": 2, "template": "plain"}))
    finally:
        first.close()
    job_id = done[-1].job_id
    # What a kill between the adapter's rename into place and the record's save leaves behind.
    record = record_of(root, job_id)
    record.update(state="running", metrics=None, finished_at=None)
    (root / JOBS_DIR / f"{job_id}.json").write_text(json.dumps(record))
    (root / JOBS_DIR / job_id).mkdir()
    (root / JOBS_DIR / job_id / EXAMPLES).write_text("".join(json.dumps(e) + "\n" for e in EXAMPLES_))
    weights = (root / "installed" / "adapter_model.safetensors").read_bytes()

    second = RunningServer(tiny_model_dir, root)
    try:
        assert list(second.client.watch_training_job(job_id))[-1].kind == done[-1].kind
        assert second.client.get_training_job(job_id).state == "succeeded"
    finally:
        second.close()
    assert (root / "installed" / "adapter_model.safetensors").read_bytes() == weights
    assert not (root / JOBS_DIR / job_id).exists()
