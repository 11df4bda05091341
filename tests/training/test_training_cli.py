"""`loraserve finetune` (a client of the Train RPC) and `loraserve train` (offline) end to end."""

from __future__ import annotations

import json

import pytest
from loraserve.trainer import synthetic
from harness import RunningServer
from loraserve.server.cli import main

EXAMPLES = [{"prompt": f"Question {i}: the word?", "completion": "XYZZY"} for i in range(8)]


@pytest.fixture(scope="module")
def srv(tiny_model_dir, tmp_path_factory):
    s = RunningServer(tiny_model_dir, tmp_path_factory.mktemp("adapters"))
    yield s
    s.close()


@pytest.fixture
def data_file(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(e) + "\n" for e in EXAMPLES))
    return path


def finetune(srv, *argv: str) -> int:
    return main(["finetune", "--server", srv.target, *argv])


def test_finetune_shows_the_stream_and_registers_the_adapter(srv, data_file, capsys):
    code = finetune(srv, "--adapter-id", "cli", "--data", str(data_file), "--max-steps", "4", "--batch-size", "2",
                    "--template", "plain", "--eval-fraction", "0.25", "--target-modules", "q_proj,v_proj")
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "queued: position 1" in err and "training: 6 examples (2 held out for eval), 4 steps" in err
    assert "[" + "#" * 24 + "] 4/4 epoch" in err and "step 4: eval loss" in err
    assert "adapter: cli" in out and "train_loss: " in out and "eval_loss: " in out
    job = srv.client.list_training_jobs()[-1]
    assert job.adapter_id == "cli" and job.settings["target_modules"] == ["q_proj", "v_proj"]
    assert srv.client.predict("Hello", adapter_id="cli", max_new_tokens=4).generated_tokens >= 1


def test_finetune_a_task_adapter_from_a_local_file(srv, tmp_path, capsys):
    path = tmp_path / "tags.jsonl"
    path.write_text("".join(json.dumps(e) + "\n" for e in synthetic.entities(8, 3)))
    code = finetune(srv, "--adapter-id", "cli-tagger", "--data", str(path), "--task", "token_cls", "--max-steps", "2",
                    "--batch-size", "4", "--eval-fraction", "0.25", "--labels", "O,B-PER,I-PER,B-LOC,I-LOC,B-ORG,"
                    "I-ORG,B-MISC,I-MISC")
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "entity_f1" in err  # the evaluation line shows the task's metrics
    job = srv.client.list_training_jobs()[-1]
    assert job.settings["task"] == "token_cls" and job.settings["labels"][:3] == ["O", "B-PER", "I-PER"]
    assert isinstance(srv.client.tag("John Smith lives in Paris.", adapter_id="cli-tagger"), list)


def test_detach_then_reattach_with_the_job_id(srv, data_file, capsys):
    assert finetune(srv, "--adapter-id", "later", "--data", str(data_file), "--max-steps", "12", "--batch-size", "1",
                    "--template", "plain", "--detach") == 0
    job_id = capsys.readouterr().out.strip()
    assert srv.client.get_training_job(job_id).adapter_id == "later"
    assert finetune(srv, "--job", job_id) == 0  # the job kept going without a client
    out, err = capsys.readouterr()
    assert f"job {job_id}" in err and "12/12" in err and "adapter: later" in out


def test_cancel_and_the_exit_codes(srv, data_file, tmp_path, capsys):
    assert finetune(srv, "--adapter-id", "endless", "--data", str(data_file), "--max-steps", "100000",
                    "--template", "plain", "--detach") == 0
    job_id = capsys.readouterr().out.strip()
    assert finetune(srv, "--cancel", job_id) == 0
    assert f"job {job_id}: cancelled (cancelled by CancelTrainingJob)" in capsys.readouterr().out
    assert finetune(srv, "--job", job_id) == 1
    assert f"job {job_id} cancelled: cancelled by CancelTrainingJob" in capsys.readouterr().err

    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "a"\n')
    assert finetune(srv, "--adapter-id", "x", "--data", str(broken)) == 2
    assert "line 2: not valid JSON" in capsys.readouterr().err
    assert finetune(srv, "--adapter-id", "x", "--data", str(data_file), "--rank", "999") == 2
    err = capsys.readouterr().err
    assert "rank must be in [1, 16] (the server's --max-lora-rank), got 999 (INVALID_ARGUMENT)" in err
    assert finetune(srv, "--job", "job-20250101-120000000-abcdef") == 2
    assert "(NOT_FOUND)" in capsys.readouterr().err
    assert finetune(srv, "--data", str(data_file)) == 2
    assert "--adapter-id is required" in capsys.readouterr().err


def test_offline_train_writes_an_adapter_that_serve_serves(learnable_model_dir, task_examples, learn_settings,
                                                          unseen_prompts, tmp_path, capsys):
    data = tmp_path / "task.jsonl"
    data.write_text("".join(json.dumps(e) + "\n" for e in task_examples))
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in learn_settings.items()]
    assert main(["train", "--data", str(data), "--model", str(learnable_model_dir), "--quantization", "fp32",
                 "--adapter-root", str(tmp_path / "adapters"), "--adapter-id", "offline", *flags]) == 0
    assert "30/30" in capsys.readouterr().err  # the progress bar
    srv = RunningServer(learnable_model_dir, tmp_path / "adapters")
    try:
        for prompt in unseen_prompts:
            got = srv.client.predict(messages=[{"role": "user", "content": prompt}], adapter_id="offline",
                                     max_new_tokens=16)
            assert got.text == "XYZZY"
    finally:
        srv.close()
