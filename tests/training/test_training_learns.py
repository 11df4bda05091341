"""The Train RPC on a real gRPC channel teaches an adapter a task the base model cannot do; the
adapter is served by the next Predict naming it, and stock PEFT gives the same greedy output."""

from __future__ import annotations

import json

import grpc
import pytest
import torch
from harness import RunningServer
from loraserve.training import Completed, Evaluation, Progress, Queued, Started
from transformers import AutoModelForCausalLM, AutoTokenizer

ANSWER = "XYZZY"


@pytest.fixture(scope="module")
def srv(learnable_model_dir, tmp_path_factory):
    s = RunningServer(learnable_model_dir, tmp_path_factory.mktemp("adapters"))
    yield s
    s.close()


def ask(srv, prompt: str, adapter_id: str = "") -> str:
    return srv.client.predict(messages=[{"role": "user", "content": prompt}], adapter_id=adapter_id,
                              max_new_tokens=16).text


@pytest.fixture(scope="module")
def trained(srv, task_examples, learn_settings, unseen_prompts):
    with pytest.raises(grpc.RpcError) as e:  # nothing to serve before the job completes
        ask(srv, unseen_prompts[0], "xyzzy")
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
    base_answers = [ask(srv, p) for p in unseen_prompts]
    events = list(srv.client.train("xyzzy", examples=task_examples, settings=learn_settings))
    return events, base_answers


def test_adapter_does_the_task_the_base_cannot(srv, trained, unseen_prompts):
    events, base_answers = trained
    assert isinstance(events[-1].kind, Completed), events[-1]
    assert all(answer != ANSWER for answer in base_answers)
    for prompt in unseen_prompts:
        assert ask(srv, prompt, "xyzzy") == ANSWER  # no restart, no LoadAdapter: the next Predict serves it
        assert ask(srv, prompt) != ANSWER  # the shared base is left as it was


def test_event_stream(srv, trained):
    events, _ = trained
    job_id = events[0].job_id
    assert all(e.job_id == job_id for e in events)
    assert events[0].kind == Queued(position=1)
    assert events[1].kind == Started(total_steps=30, train_examples=28, eval_examples=4, truncated_examples=0)
    progress = [e.kind for e in events if isinstance(e.kind, Progress)]
    assert [p.step for p in progress] == list(range(1, 31)) and all(p.total_steps == 30 for p in progress)
    assert progress[-1].eta_seconds == 0 and all(p.tokens_per_second > 0 and p.learning_rate == 2e-2 for p in progress)
    assert progress[-1].loss < progress[0].loss / 4
    assert [e.kind.step for e in events if isinstance(e.kind, Evaluation)] == [10, 20, 30]
    done = events[-1].kind
    assert done.adapter_id == "xyzzy" and done.metrics.steps == 30 and done.metrics.tokens > 0
    assert done.metrics.eval_loss == events[-2].kind.eval_loss
    assert [e.time for e in events] == sorted(e.time for e in events)

    job = srv.client.get_training_job(job_id)
    assert job.state == "succeeded" and job.adapter_id == "xyzzy" and job.metrics == done.metrics
    assert job.progress == progress[-1] and job.examples == 32 and job.dataset_path == "" and not job.error
    assert job.created_at <= job.started_at <= job.finished_at
    assert job.settings["rank"] == 8 and job.settings["template"] == "chat" and job.settings["seed"] == 42
    assert [j.job_id for j in srv.client.list_training_jobs()] == [job_id]
    assert srv.metric("loraserve_training_jobs", state="succeeded") == 1
    assert srv.metric("loraserve_training_jobs", state="running") == 0
    assert srv.metric("loraserve_training_tokens_total") == done.metrics.tokens

    meta = json.loads((srv.registry.root / "xyzzy" / "loraserve_metadata.json").read_text())
    assert meta["task_id"] == job_id and meta["adapter_id"] == "xyzzy" and meta["data"]["sha256"] == job.data_sha256
    assert not [p.name for p in srv.registry.root.iterdir() if p.name.startswith(".train-")]


def test_watch_after_completion_replays_the_collapsed_history(srv, trained):
    events, _ = trained
    replay = list(srv.client.watch_training_job(events[0].job_id))
    kinds = [type(e.kind) for e in replay]
    assert kinds == [Queued, Started, Progress, Evaluation, Progress, Evaluation, Progress, Evaluation, Completed]
    assert [e.kind.step for e in replay if isinstance(e.kind, Progress)] == [10, 20, 30]
    assert replay[-1] == events[-1]


def stock_peft_greedy(model_dir, adapter_dir, prompt: str, n: int = 16) -> str:
    from peft import PeftModel

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), adapter_dir).eval()
    ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def test_stock_peft_loads_the_trained_adapter_and_agrees(srv, trained, learnable_model_dir, unseen_prompts):
    adapter_dir = srv.registry.root / "xyzzy"
    for prompt in [*unseen_prompts, "Question 3 about the sea: what is the word?"]:
        assert stock_peft_greedy(learnable_model_dir, adapter_dir, prompt) == ask(srv, prompt, "xyzzy")


def test_overwrite_replaces_a_served_adapter(srv, trained, task_examples, learn_settings, unseen_prompts):
    assert ask(srv, unseen_prompts[0], "xyzzy") == ANSWER  # resident in a device slot now
    with pytest.raises(grpc.RpcError) as e:
        list(srv.client.train("xyzzy", examples=task_examples, settings=learn_settings))
    assert e.value.code() == grpc.StatusCode.ALREADY_EXISTS and "overwrite" in e.value.details()
    other = [{**example, "completion": "PLUGH"} for example in task_examples]
    events = list(srv.client.train("xyzzy", examples=other, settings=learn_settings, overwrite=True))
    assert isinstance(events[-1].kind, Completed)
    assert ask(srv, unseen_prompts[0], "xyzzy") == "PLUGH"  # the stale slot was dropped
