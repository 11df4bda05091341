"""Checkpoints: a run stopped and resumed from one ends exactly as a run that never stopped, and a
checkpoint that cannot be written (a full disk) leaves the previous one whole."""

from __future__ import annotations

import errno
import os

import pytest
import torch
from disk_faults import file_size_limit
from loraserve.trainer import checkpoint as checkpoint_module
from loraserve.trainer.checkpoint import (
    Checkpointing,
    CheckpointUnreadable,
    TrainState,
    load_checkpoint,
    save_checkpoint,
)
from loraserve.trainer.data import parse_records, prepare
from loraserve.trainer.events import Evaluation, Progress
from loraserve.trainer.loop import CheckpointMismatch, Suspended, train_adapter
from loraserve.trainer.settings import TrainSettings

# Everything a resume must carry: dropout (the RNG), accumulation, warmup and decay (the schedule),
# weight decay and clipping (AdamW), several epochs (the shuffle), evaluations and early stopping.
SETTINGS = TrainSettings(learning_rate=1e-2, dropout=0.1, batch_size=2, gradient_accumulation_steps=2, max_steps=14,
                         warmup_ratio=0.2, weight_decay=0.01, eval_fraction=0.2, eval_steps=3,
                         early_stopping_patience=50, seed=7, template="plain")


def train(model, data, settings=SETTINGS, **kwargs):
    events = []
    on_event = kwargs.pop("on_event", events.append)
    result = train_adapter(model.base, model.ctx, model.wrapped, settings, data, on_event=on_event, **kwargs)
    return result, events


@pytest.fixture(scope="module")
def data(fp32_model):
    records = [{"prompt": f"Question {i}: what is the word?", "completion": "XYZZY"} for i in range(15)]
    return prepare(parse_records(records), fp32_model.base.tokenizer, SETTINGS, fp32_model.base.eos_token_ids)


@pytest.fixture(scope="module")
def uninterrupted(fp32_model, data):
    return train(fp32_model, data)


def stopped_run(model, data, tmp_path, stop_at: int, every_steps: int = 4) -> dict[int, object]:
    """Run with a checkpoint every `every_steps` steps until Progress(stop_at) suspends it; returns
    each checkpoint, read back from its file, by step."""
    checkpoints = Checkpointing(save=lambda state: save_checkpoint(tmp_path / f"{state.step}.safetensors", state),
                                every_steps=every_steps)

    def on_event(event):
        if isinstance(event, Progress) and event.step == stop_at:
            checkpoints.suspend.set()

    with pytest.raises(Suspended):
        train(model, data, checkpoints=checkpoints, on_event=on_event)
    return {int(p.stem): load_checkpoint(p) for p in tmp_path.glob("*.safetensors")}


def assert_same_run(resumed, uninterrupted):
    (got, got_events), (want, want_events) = resumed, uninterrupted
    for name, (a, b) in want.modules.items():
        assert torch.equal(got.modules[name][0], a) and torch.equal(got.modules[name][1], b), name
    keep = ("train_loss", "eval_loss", "perplexity", "steps", "tokens", "stopped_early")
    assert {k: getattr(got.metrics, k) for k in keep} == {k: getattr(want.metrics, k) for k in keep}
    return got_events, want_events


@pytest.mark.parametrize("where", ["mid-step", "in-evaluation"])
def test_a_suspended_run_resumes_to_the_same_adapter(fp32_model, data, uninterrupted, tmp_path, where):
    # Step 6 is evaluated (eval_steps=3): Progress(6) comes just before that evaluation starts.
    stop_at = 6 if where == "in-evaluation" else 5
    states = stopped_run(fp32_model, data, tmp_path, stop_at)
    assert sorted(states) == [4, stop_at]  # the periodic one, then the suspension's
    state = states[stop_at]
    assert state.info["eval_pending"] == (where == "in-evaluation")

    resumed = train(fp32_model, data, checkpoints=Checkpointing(save=lambda s: None, resume=state))
    got_events, want_events = assert_same_run(resumed, uninterrupted)
    # The resumed session reports the steps and evaluations after the checkpoint, as the single run did.
    progress = [(e.step, e.loss, e.learning_rate) for e in got_events if isinstance(e, Progress)]
    assert progress == [(e.step, e.loss, e.learning_rate) for e in want_events
                        if isinstance(e, Progress) and e.step > stop_at]
    evals = [e for e in got_events if isinstance(e, Evaluation)]
    assert evals == [e for e in want_events if isinstance(e, Evaluation) and e.step >= 6]


def test_a_crashed_run_resumes_from_its_last_periodic_checkpoint(fp32_model, data, uninterrupted, tmp_path):
    # A crash leaves whatever the schedule wrote last (step 10 here); steps 11 on are done again.
    states = stopped_run(fp32_model, data, tmp_path, 11, every_steps=5)
    assert sorted(states) == [5, 10, 11]
    resumed = train(fp32_model, data, checkpoints=Checkpointing(save=lambda s: None, resume=states[10]))
    assert_same_run(resumed, uninterrupted)


def test_early_stopping_state_survives_a_resume(fp32_model, data, tmp_path):
    # A learning rate too small to move the outputs: every evaluation equals the first, so patience 2
    # stops the run at step 9 (evaluations at 3, 6, 9) and keeps the weights of step 3.
    settings = TrainSettings(**{**SETTINGS.to_dict(), "learning_rate": 1e-12, "early_stopping_patience": 2})
    want, _ = train(fp32_model, data, settings)
    assert want.metrics.stopped_early and want.metrics.steps == 9

    checkpoints = Checkpointing(save=lambda s: states.append(s), every_steps=7)
    states: list[TrainState] = []

    def on_event(event):
        if isinstance(event, Progress) and event.step == 8:
            checkpoints.suspend.set()

    with pytest.raises(Suspended):
        train(fp32_model, data, settings, checkpoints=checkpoints, on_event=on_event)
    save_checkpoint(tmp_path / "c.safetensors", states[-1])
    state = load_checkpoint(tmp_path / "c.safetensors")
    assert state.info["bad_evals"] == 1 and any(k.startswith("best.") for k in state.tensors)
    got, _ = train(fp32_model, data, settings, checkpoints=Checkpointing(save=lambda s: None, resume=state))
    assert got.metrics.stopped_early and got.metrics.steps == 9 and got.metrics.eval_loss == want.metrics.eval_loss
    for name, (a, b) in want.modules.items():
        assert torch.equal(got.modules[name][0], a) and torch.equal(got.modules[name][1], b)


def test_a_checkpoint_of_another_run_is_refused(fp32_model, data, tmp_path):
    state = stopped_run(fp32_model, data, tmp_path, 2)[2]
    other = TrainSettings(**{**SETTINGS.to_dict(), "learning_rate": 2e-2})
    with pytest.raises(CheckpointMismatch, match="checkpoint at step 2 belongs to another run .its settings differ"):
        train(fp32_model, data, other, checkpoints=Checkpointing(save=lambda s: None, resume=state))

    (tmp_path / "bad.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}")
    with pytest.raises(CheckpointUnreadable, match="bad.safetensors"):
        load_checkpoint(tmp_path / "bad.safetensors")
    assert load_checkpoint(tmp_path / "none.safetensors") is None


def test_a_failed_write_leaves_the_previous_checkpoint_whole(fp32_model, data, tmp_path, monkeypatch):
    state = stopped_run(fp32_model, data, tmp_path, 2)[2]
    path = tmp_path / "2.safetensors"
    before = path.read_bytes()
    state.info["step"] = 3

    with file_size_limit(len(before) // 2), pytest.raises(OSError) as e:
        save_checkpoint(path, state)
    assert e.value.errno == errno.EFBIG
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == [path.name]

    def disk_full(fd):  # the last write of a full disk: the data are in the page cache, fsync fails
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(checkpoint_module.os, "fsync", disk_full)
    with pytest.raises(OSError, match="No space left"):
        save_checkpoint(path, state)
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == [path.name]
    monkeypatch.undo()
    save_checkpoint(path, state)
    assert load_checkpoint(path).step == 3
