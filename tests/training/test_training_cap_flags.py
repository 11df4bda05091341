"""Training caps as serve flags: --max-train-examples and --max-queued-jobs (each also
LORASERVE_*) reach TrainingConfig, and a Train request over the examples cap is refused naming the flag."""

from __future__ import annotations

import argparse

import grpc
import pytest
from harness import RunningServer
from loraserve.server.cli import add_serve_arguments, config_from_args
from loraserve.server.config import ServerConfig, TrainingConfig

CAP = 3
EXAMPLES = [{"prompt": f"Question {i}: the word?", "completion": "XYZZY"} for i in range(CAP + 1)]


def serve_config(*argv: str) -> ServerConfig:
    p = argparse.ArgumentParser()
    add_serve_arguments(p)
    return config_from_args(p.parse_args(argv))


def test_cap_flags_and_their_variables_reach_the_training_config(monkeypatch):
    default = serve_config().training
    assert (default.max_examples, default.max_queued_jobs) == (TrainingConfig().max_examples,
                                                               TrainingConfig().max_queued_jobs)
    flagged = serve_config("--max-train-examples", "5", "--max-queued-jobs", "2").training
    assert (flagged.max_examples, flagged.max_queued_jobs) == (5, 2)
    monkeypatch.setenv("LORASERVE_MAX_TRAIN_EXAMPLES", "7")
    monkeypatch.setenv("LORASERVE_MAX_QUEUED_JOBS", "8")
    from_env = serve_config().training
    assert (from_env.max_examples, from_env.max_queued_jobs) == (7, 8)
    assert serve_config("--max-train-examples", "9").training.max_examples == 9  # the flag wins


@pytest.mark.parametrize("flag,field", [("--max-train-examples", "max_examples"),
                                        ("--max-queued-jobs", "max_queued_jobs"),
                                        ("--max-train-steps", "max_steps_per_job"),
                                        ("--max-train-tokens", "max_tokens_per_job")])
def test_a_cap_below_one_is_refused_naming_its_flag(flag, field):
    with pytest.raises(ValueError, match=f"^{flag} must be >= 1$"):
        serve_config(flag, "0")
    with pytest.raises(ValueError, match=f"^{flag} must be >= 1$"):
        TrainingConfig(**{field: 0})


@pytest.fixture(scope="module")
def srv(tiny_model_dir, tmp_path_factory):
    data_root = tmp_path_factory.mktemp("data")
    (data_root / "over.jsonl").write_text("".join(f'{{"prompt": "p{i}", "completion": "c"}}\n' for i in range(CAP + 1)))
    training = serve_config("--max-train-examples", str(CAP), "--data-root", str(data_root)).training
    s = RunningServer(tiny_model_dir, tmp_path_factory.mktemp("root"), training=training)
    yield s
    s.close()


@pytest.mark.parametrize("source", ["inline", "file"])
def test_more_examples_than_the_flag_allows_are_refused_naming_it(srv, source):
    kwargs = dict(examples=EXAMPLES) if source == "inline" else dict(dataset_path="over.jsonl")
    with pytest.raises(grpc.RpcError) as e:
        next(srv.client.train("capped", settings={"max_steps": 1}, **kwargs))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"more than {CAP} examples" in e.value.details() and "--max-train-examples" in e.value.details()
    assert srv.client.list_training_jobs() == []


def test_as_many_examples_as_the_flag_allows_train(srv):
    events = list(srv.client.train("capped", examples=EXAMPLES[:CAP], settings={"max_steps": 1, "eval_fraction": 0.0},
                                   timeout=120))
    assert type(events[-1].kind).__name__ == "Completed", events[-1]
