"""Job mechanics through the real gRPC server: inference while training, queueing, cancel,
re-attach, and failures that leave the server serving."""

from __future__ import annotations

import grpc
import pytest
import torch
from harness import RunningServer, copy_adapters
from loraserve.server.config import TrainingConfig
from loraserve.training import Cancelled, Completed, Failed, Progress, Queued, Started

EXAMPLES = [{"prompt": f"Question {i}: the word?", "completion": "XYZZY"} for i in range(8)]
# Far more steps than a test waits for: these jobs end only when cancelled.
ENDLESS = {"max_steps": 100_000,  # the default --max-train-steps; hours on a CPU
           "batch_size": 2, "eval_fraction": 0.0, "template": "plain"}
PROMPTS = ["Hello there", "Numbers: one two", "Once upon a time"]


@pytest.fixture(scope="module")
def srv(tiny_model_dir, adapter_sources, tmp_path_factory):
    root = copy_adapters(adapter_sources, tmp_path_factory.mktemp("root"), names=("a0",))
    s = RunningServer(tiny_model_dir, root, training=TrainingConfig(max_concurrent_jobs=1, max_queued_jobs=2))
    yield s
    s.close()


def until(stream, predicate):
    """Events up to and including the first one matching."""
    seen = []
    for event in stream:
        seen.append(event)
        if predicate(event):
            return seen
    raise AssertionError(f"the stream ended without the expected event: {seen[-3:]}")


def progressed(step: int):
    return lambda e: isinstance(e.kind, Progress) and e.kind.step >= step


def leftovers(srv) -> list[str]:
    return [p.name for p in srv.registry.root.iterdir() if p.name.startswith(".train-")]


def test_inference_answers_while_a_job_trains(srv):
    alone = {(p, a): srv.client.predict(p, adapter_id=a, max_new_tokens=12).text for p in PROMPTS for a in ("", "a0")}
    stream = srv.client.train("busy", examples=EXAMPLES, settings=ENDLESS)
    job_id = until(stream, progressed(1))[0].job_id
    during = {(p, a): srv.client.predict(p, adapter_id=a, max_new_tokens=12).text for p in PROMPTS for a in ("", "a0")}
    progress = until(stream, progressed(1)).pop().kind.step  # the job went on meanwhile
    assert during == alone  # turn-taking leaves serving's model state exactly as it was
    assert srv.metric("loraserve_training_jobs", state="running") == 1
    job = srv.client.cancel_training_job(job_id)
    assert job.state == "cancelled" and job.error == "cancelled by CancelTrainingJob" and job.progress.step >= progress
    assert isinstance(list(stream)[-1].kind, Cancelled)
    assert srv.metric("loraserve_training_jobs", state="running") == 0
    with pytest.raises(grpc.RpcError) as e:  # a cancelled job leaves no adapter behind
        srv.client.get_adapter("busy")
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
    assert leftovers(srv) == []
    again = srv.client.cancel_training_job(job_id)  # idempotent
    assert again.state == "cancelled" and again.finished_at == job.finished_at


def test_queue_positions_cancel_and_limits(srv):
    a = srv.client.train("qa", examples=EXAMPLES, settings=ENDLESS)
    first = until(a, lambda e: isinstance(e.kind, Started))
    assert first[0].kind == Queued(1)
    b = srv.client.train("qb", examples=EXAMPLES, settings=ENDLESS)
    b_id = next(b)
    c = srv.client.train("qc", examples=EXAMPLES, settings=ENDLESS)  # sent after b was accepted
    c_id = next(c)
    assert (b_id.kind, c_id.kind) == (Queued(1), Queued(2))
    b_id, c_id = b_id.job_id, c_id.job_id
    assert srv.client.get_training_job(c_id).queue_position == 2
    assert srv.metric("loraserve_training_jobs", state="queued") == 2

    for adapter_id, code in (("qb", "ALREADY_EXISTS"), ("qd", "RESOURCE_EXHAUSTED")):
        with pytest.raises(grpc.RpcError) as e:
            next(srv.client.train(adapter_id, examples=EXAMPLES, settings=ENDLESS))
        assert e.value.code().name == code, e.value.details()

    assert srv.client.cancel_training_job(first[0].job_id).state == "cancelled"
    assert isinstance(list(a)[-1].kind, Cancelled)
    assert [type(e.kind) for e in until(b, lambda e: isinstance(e.kind, Started))] == [Started]
    assert next(c).kind == Queued(1)  # moved up when b started
    job = srv.client.cancel_training_job(c_id)  # still queued: cancelled at once, never started
    assert job.state == "cancelled" and job.started_at is None and job.progress is None
    assert isinstance(list(c)[-1].kind, Cancelled)
    until(b, progressed(2))
    assert srv.client.cancel_training_job(b_id).state == "cancelled"
    assert [j.state for j in srv.client.list_training_jobs(state="queued")] == []
    assert leftovers(srv) == []


def test_a_disconnected_job_keeps_training_and_watch_reattaches(srv):
    stream = srv.client.train("reattach", examples=EXAMPLES, settings=ENDLESS)
    seen = until(stream, progressed(2))
    stream.close()  # the client goes away; the job does not
    job_id = seen[0].job_id
    watch = srv.client.watch_training_job(job_id)
    replay = [next(watch), next(watch), next(watch)]
    assert [type(e.kind) for e in replay] == [Queued, Started, Progress]
    assert replay[:2] == seen[:2] and replay[2].kind.step >= 2
    live = until(watch, progressed(replay[2].kind.step + 3))
    assert srv.client.get_training_job(job_id).state == "running"
    steps = [e.kind.step for e in live]
    assert steps == sorted(steps) and len(set(steps)) == len(steps)  # nothing repeated after the replay
    srv.client.cancel_training_job(job_id)
    assert isinstance(list(watch)[-1].kind, Cancelled)


def test_cancelling_a_finished_job_is_refused(srv):
    events = list(srv.client.train("done", examples=EXAMPLES, settings={"max_steps": 1, "template": "plain"}))
    assert isinstance(events[-1].kind, Completed)
    with pytest.raises(grpc.RpcError) as e:
        srv.client.cancel_training_job(events[0].job_id)
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "already succeeded" in e.value.details()


def nan_output(module, args, out):
    return out * float("nan")


def out_of_memory(module, args, out):
    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")


def bug(module, args, out):
    raise RuntimeError("boom")


@pytest.mark.parametrize("hook, reason", [
    (nan_output, "the training loss became nan at step 1: lower learning_rate or check the data"),
    (out_of_memory, "out of memory: lower batch_size or max_length, or set gradient_checkpointing"),
    (bug, "internal error (RuntimeError: boom); this is a bug, please report it"),
], ids=["nan", "oom", "bug"])
def test_a_failing_job_reports_why_and_the_server_keeps_serving(srv, hook, reason):
    before = srv.client.predict(PROMPTS[0], adapter_id="a0", max_new_tokens=8).text
    layer = srv.server.wrapped["model.layers.0.mlp.down_proj"]
    # Only training passes break: inference runs through the same layer meanwhile.
    handle = layer.register_forward_hook(lambda m, a, out: hook(m, a, out) if m.ctx.train is not None else None)
    try:
        events = list(srv.client.train("broken", examples=EXAMPLES, settings={"max_steps": 3, "template": "plain"}))
    finally:
        handle.remove()
    assert events[-1].kind == Failed(reason)
    job = srv.client.get_training_job(events[0].job_id)
    assert job.state == "failed" and job.error == reason
    assert srv.server.training.job(job.job_id).valid is None  # the data set and tensors are let go
    assert srv.server.ctx.train is None and not srv.server.base.model.training
    assert srv.client.predict(PROMPTS[0], adapter_id="a0", max_new_tokens=8).text == before
    assert "broken" not in [a.adapter_id for a in srv.client.list_adapters()] and leftovers(srv) == []
