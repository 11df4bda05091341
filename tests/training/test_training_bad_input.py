"""Every bad Train request is refused with a clear status before a job exists or the model runs."""

from __future__ import annotations

import threading

import grpc
import pytest
from harness import RunningServer, copy_adapters
from loraserve.server.config import TrainingConfig
from loraserve.training import Completed, Started
from loraserve.v1 import training_pb2

GOOD = [{"prompt": f"Question {i}: the word?", "completion": "XYZZY"} for i in range(4)]
LONG = "many words " * 40  # about 80 tokens
SHORT = {"max_length": 32, "template": "plain"}  # plain: no chat template's system prompt to fill the 32
FILES = {
    "good.jsonl": '{"prompt": "a", "completion": "b"}\n\n{"prompt": "c", "completion": "d"}\n',
    "broken.jsonl": '{"prompt": "a", "completion": "b"}\n\n{"prompt": "c", "completion": \n',
    "missing.jsonl": '{"prompt": "a", "completion": "b"}\n{"prompt": "c"}\n',
    "blank.jsonl": "\n  \n",
    "array.jsonl": '["prompt", "completion"]\n',
}


@pytest.fixture(scope="module")
def srv(tiny_model_dir, adapter_sources, tmp_path_factory):
    data_root = tmp_path_factory.mktemp("data")
    for name, text in FILES.items():
        (data_root / name).write_text(text)
    (data_root.parent / "outside.jsonl").write_text(FILES["good.jsonl"])
    (data_root / "escape.jsonl").symlink_to(data_root.parent / "outside.jsonl")
    root = copy_adapters(adapter_sources, tmp_path_factory.mktemp("root"), names=("a0",))
    s = RunningServer(tiny_model_dir, root,
                      training=TrainingConfig(data_root=str(data_root), max_examples=6, max_steps_per_job=50,
                                              max_tokens_per_job=5000))
    forwards = []
    layer = s.server.wrapped["model.layers.0.self_attn.q_proj"]
    hook = layer.register_forward_pre_hook(lambda m, args: forwards.append(1) if m.ctx.train is not None else None)
    s.training_forwards = forwards
    yield s
    hook.remove()
    s.close()


def refused(srv, adapter_id="new", **kwargs) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as e:
        next(srv.client.train(adapter_id, **kwargs))
    return e.value


CASES = {
    "malformed jsonl": (dict(dataset_path="broken.jsonl"), "INVALID_ARGUMENT", "line 3: not valid JSON"),
    "not an object": (dict(dataset_path="array.jsonl"), "INVALID_ARGUMENT",
                      "line 1: expected a JSON object, got an array"),
    "missing field in a file": (dict(dataset_path="missing.jsonl"), "INVALID_ARGUMENT",
                                "line 2: missing field 'completion'"),
    "missing field inline": (dict(examples=[GOOD[0], {"prompt": "x"}]), "INVALID_ARGUMENT",
                             "example 2: missing field 'completion'"),
    "missing prompt inline": (dict(examples=[{"completion": "x"}]), "INVALID_ARGUMENT",
                              "example 1: missing field 'prompt'"),
    "empty completion": (dict(examples=[{"prompt": "x", "completion": " "}]), "INVALID_ARGUMENT",
                         "example 1: completion is empty"),
    "bad role": (dict(examples=[{"messages": [{"role": "robot", "content": "x"}]}]), "INVALID_ARGUMENT",
                 "example 1: messages[0]: role 'robot' is not one of"),
    "no data": (dict(), "INVALID_ARGUMENT", "the data set is empty"),
    "empty file": (dict(dataset_path="blank.jsonl"), "INVALID_ARGUMENT", "holds no examples"),
    "both sources": (dict(examples=GOOD, dataset_path="good.jsonl"), "INVALID_ARGUMENT",
                     "either examples or dataset_path"),
    "too many examples": (dict(examples=GOOD * 2), "INVALID_ARGUMENT", "more than 6 examples"),
    "longer than max_length": (dict(examples=[GOOD[0], {"prompt": "x", "completion": LONG}, GOOD[1]],
                                    settings=SHORT), "INVALID_ARGUMENT", "example 2: longer than max_length=32 tokens"),
    "prompt fills max_length": (dict(examples=[{"prompt": LONG, "completion": "x"}], settings=SHORT, truncate=True),
                                "INVALID_ARGUMENT", "no completion token would be learned"),
    "dataset outside the root": (dict(dataset_path="../outside.jsonl"), "INVALID_ARGUMENT", "outside"),
    "absolute dataset path": (dict(dataset_path="/etc/hostname"), "INVALID_ARGUMENT", "outside"),
    "symlink escaping the root": (dict(dataset_path="escape.jsonl"), "INVALID_ARGUMENT", "outside"),
    "missing dataset": (dict(dataset_path="nope.jsonl"), "NOT_FOUND", "'nope.jsonl' names no file"),
    "rank 0": (dict(examples=GOOD, settings={"rank": 0}), "INVALID_ARGUMENT", "rank must be in [1, 1024], got 0"),
    "rank above the server's": (dict(examples=GOOD, settings={"rank": 32}), "INVALID_ARGUMENT",
                                "rank must be in [1, 16] (the server's --max-lora-rank)"),
    "learning rate": (dict(examples=GOOD, settings={"learning_rate": 2.0}), "INVALID_ARGUMENT",
                      "learning_rate must be in (0.0, 1.0], got 2.0"),
    "dropout": (dict(examples=GOOD, settings={"dropout": 1.0}), "INVALID_ARGUMENT", "dropout must be in [0.0, 1.0)"),
    "epochs 0": (dict(examples=GOOD, settings={"epochs": 0}), "INVALID_ARGUMENT", "epochs must be in [1, 1000]"),
    "max_length above the context": (dict(examples=GOOD, settings={"max_length": 4096}), "INVALID_ARGUMENT",
                                     "max_length must be in [8, 512] (the model's context window)"),
    "eval fraction": (dict(examples=GOOD, settings={"eval_fraction": 0.9}), "INVALID_ARGUMENT", "eval_fraction"),
    "unknown target module": (dict(examples=GOOD, settings={"target_modules": ["q_proj", "lm_head"]}),
                              "INVALID_ARGUMENT", "target_modules lm_head match no layer"),
    "malformed adapter id": (dict(adapter_id="../evil", examples=GOOD), "INVALID_ARGUMENT", "malformed"),
    "too many steps": (dict(examples=GOOD, settings={"max_steps": 51}), "INVALID_ARGUMENT",
                       "plans 51 optimizer steps; the server's --max-train-steps is 50"),
    "too many epochs' steps": (dict(examples=GOOD, settings={"epochs": 60}), "INVALID_ARGUMENT",
                               "--max-train-steps is 50"),
    "too many tokens": (dict(examples=GOOD, settings={"max_steps": 50, "batch_size": 8,
                                                      "gradient_accumulation_steps": 4}),
                        "INVALID_ARGUMENT", "the server's --max-train-tokens is 5000"),
    "existing adapter": (dict(adapter_id="a0", examples=GOOD), "ALREADY_EXISTS", "set overwrite"),
}


@pytest.mark.parametrize("case", CASES)
def test_refused_before_any_work(srv, case):
    kwargs, code, message = CASES[case]
    error = refused(srv, **kwargs)
    assert error.code().name == code, error.details()
    assert message in error.details()
    assert srv.client.list_training_jobs() == []
    assert srv.training_forwards == []
    assert not [t for t in threading.enumerate() if t.name.startswith("train-")]


def test_unknown_enum_value_is_refused(srv):
    request = training_pb2.TrainRequest(adapter_id="new", settings=training_pb2.TrainingSettings(lr_scheduler=9))
    with pytest.raises(grpc.RpcError) as e:
        next(srv.client.training.Train(request))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "not a known LrScheduler" in e.value.details()


@pytest.mark.parametrize("call", ["get_training_job", "cancel_training_job", "watch_training_job"])
def test_unknown_and_malformed_job_ids(srv, call):
    for job_id, code in (("job-20250101-120000000-abcdef", "NOT_FOUND"), ("../x", "INVALID_ARGUMENT")):
        with pytest.raises(grpc.RpcError) as e:
            result = getattr(srv.client, call)(job_id)
            if call == "watch_training_job":
                list(result)
        assert e.value.code().name == code, (job_id, e.value.details())
    with pytest.raises(grpc.RpcError) as e:
        srv.client.training.ListTrainingJobs(training_pb2.ListTrainingJobsRequest(page_token="../x"))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize("call", ["get_training_job", "cancel_training_job", "watch_training_job"])
def test_job_ids_ending_in_a_newline_are_malformed(srv, call):
    # The job id check used re.match with "$", which also matches before a final newline: a well-formed id
    # plus "\n" passed it (NOT_FOUND, or a lookup under a name no job has) instead of INVALID_ARGUMENT.
    with pytest.raises(grpc.RpcError) as e:
        result = getattr(srv.client, call)("job-20250101-120000000-abcdef\n")
        if call == "watch_training_job":
            list(result)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, e.value.details()
    assert "malformed" in e.value.details()
    with pytest.raises(grpc.RpcError) as e:
        srv.client.training.ListTrainingJobs(
            training_pb2.ListTrainingJobsRequest(page_token="job-20250101-120000000-abcdef\n"))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_accepted_with_truncate_and_overwrite(srv):
    long = [GOOD[0], {"prompt": "x", "completion": LONG}, GOOD[1]]
    events = list(srv.client.train("new", truncate=True, examples=long,
                                   settings={**SHORT, "max_steps": 1, "eval_fraction": 0.0}))
    assert events[1].kind == Started(total_steps=1, train_examples=3, eval_examples=0, truncated_examples=1)
    assert isinstance(events[-1].kind, Completed)
    events = list(srv.client.train("a0", overwrite=True, dataset_path="good.jsonl", settings={"max_steps": 1}))
    assert isinstance(events[-1].kind, Completed)
    assert {j.adapter_id for j in srv.client.list_training_jobs(state="succeeded")} == {"new", "a0"}
    assert srv.client.list_training_jobs(state="failed") == []
    assert srv.client.get_training_job(events[0].job_id).dataset_path == "good.jsonl"
