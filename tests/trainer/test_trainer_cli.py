"""`loraserve train`: flags to settings, an adapter written end to end, bad input is exit code 2."""

from __future__ import annotations

import argparse
import io
import json

import pytest
from loraserve.trainer.cli import add_train_arguments, run_train
from loraserve.trainer.events import Evaluation, Progress
from loraserve.trainer.output import METADATA_FILE
from loraserve.trainer.progress import ProgressBar, format_duration, progress_line


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="loraserve train")
    add_train_arguments(parser)
    return parser.parse_args(list(argv))


@pytest.fixture
def data_file(tmp_path, xyzzy):
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in xyzzy(8)))
    return path


def tiny_args(tiny_model_dir, data_file, *extra: str) -> argparse.Namespace:
    return parse("--data", str(data_file), "--model", str(tiny_model_dir), "--quantization", "fp32",
                 "--epochs", "1", "--batch-size", "2", "--rank", "4", "--eval-fraction", "0.25", *extra)


def test_trains_and_writes_an_adapter(tmp_path, tiny_model_dir, data_file, capsys):
    out = tmp_path / "adapters" / "xyzzy"
    assert run_train(tiny_args(tiny_model_dir, data_file, "--output", str(out), "--target-modules", "q_proj,v_proj",
                               "--no-bf16", "--learning-rate", "1e-3")) == 0
    captured = capsys.readouterr()
    assert f"adapter: {out}" in captured.out and "eval_loss: " in captured.out and "train_loss: " in captured.out
    assert "training: 6 examples (2 held out for eval), 3 steps" in captured.err and "3/3" in captured.err
    meta = json.loads((out / METADATA_FILE).read_text())
    assert meta["settings"]["target_modules"] == ["q_proj", "v_proj"] and meta["settings"]["bf16"] is False
    assert meta["settings"]["learning_rate"] == 1e-3 and meta["settings"]["rank"] == 4
    assert (out / "adapter_model.safetensors").is_file()


def test_adapter_root_and_id(tmp_path, tiny_model_dir, data_file, capsys):
    root = tmp_path / "adapters"
    assert run_train(tiny_args(tiny_model_dir, data_file, "--adapter-root", str(root), "--adapter-id", "x1",
                               "--max-steps", "1")) == 0
    assert json.loads((root / "x1" / METADATA_FILE).read_text())["adapter_id"] == "x1"
    # Again without --overwrite: refused before any training.
    assert run_train(tiny_args(tiny_model_dir, data_file, "--adapter-root", str(root), "--adapter-id", "x1")) == 2
    assert "already exists" in capsys.readouterr().err
    assert run_train(tiny_args(tiny_model_dir, data_file, "--adapter-root", str(root), "--adapter-id", "x1",
                               "--max-steps", "1", "--overwrite")) == 0


def test_malformed_file_is_exit_2_with_the_line(tmp_path, data_file, capsys):
    data_file.write_text(data_file.read_text() + '{"prompt": "p", "completion": \n')
    args = parse("--data", str(data_file), "--output", str(tmp_path / "out"), "--model", str(tmp_path / "none"))
    assert run_train(args) == 2
    err = capsys.readouterr().err
    assert "line 9: not valid JSON" in err and err.startswith("loraserve train: error:")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("flags, message", [
    (["--dropout", "1.5"], "dropout must be in"),
    (["--target-modules", "q_proj,nope"], "target_modules nope match no layer"),
    (["--adapter-id", "x"], "either --output or --adapter-root"),
    (["--max-length", "4096"], "max_length must be in [8, 512]"),
])
def test_bad_settings_are_exit_2(tmp_path, tiny_model_dir, data_file, capsys, flags, message):
    assert run_train(tiny_args(tiny_model_dir, data_file, "--output", str(tmp_path / "o"), *flags)) == 2
    assert message in capsys.readouterr().err


def test_output_is_required_and_model_must_exist(tmp_path, data_file, capsys):
    assert run_train(parse("--data", str(data_file))) == 2
    assert "--output DIR" in capsys.readouterr().err
    assert run_train(parse("--data", str(data_file), "--output", str(tmp_path / "o"), "--model",
                           str(tmp_path / "missing"))) == 2
    assert "cannot load the base model" in capsys.readouterr().err
    assert run_train(parse("--data", str(data_file), "--adapter-root", str(tmp_path), "--adapter-id", "../up")) == 2
    assert "adapter id '../up' is malformed" in capsys.readouterr().err


def test_progress_bar_in_a_log_file():
    stream = io.StringIO()
    bar = ProgressBar(stream)
    bar(Progress(step=3, total_steps=4, epoch=0.75, loss=1.5, learning_rate=2e-4, tokens_per_second=1234.5,
                 eta_seconds=3725))
    bar(Evaluation(step=4, eval_loss=1.25, perplexity=3.49))
    lines = stream.getvalue().splitlines()
    assert lines[0] == ("[##################......] 3/4 epoch 0.75  loss 1.5000  lr 2.00e-04  1,234 tok/s  "
                        "ETA 1:02:05")
    assert lines[1] == "step 4: eval loss 1.2500, perplexity 3.49"
    assert format_duration(65) == "01:05" and progress_line(
        Progress(1, 1, 1.0, 0.1, 1e-3, 10.0, 0.0)).startswith("[" + "#" * 24 + "] 1/1")
