"""TrainSettings: defaults, range checks naming the field, unknown keys refused."""

from __future__ import annotations

import pytest
from loraserve.core.errors import InvalidArgument
from loraserve.trainer.settings import TrainSettings


def test_defaults_are_the_usual_lora_ones():
    s = TrainSettings()
    assert (s.rank, s.alpha, s.dropout, s.learning_rate) == (8, 16.0, 0.05, 2e-4)
    assert s.target_modules == ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    assert (s.epochs, s.max_steps, s.batch_size, s.gradient_accumulation_steps) == (3, 0, 4, 1)
    assert (s.warmup_ratio, s.lr_scheduler, s.max_grad_norm, s.eval_fraction, s.max_length) == (
        0.03, "linear", 1.0, 0.1, 512)


def test_the_default_learning_rate_follows_the_task_kind():
    """QA's heads need more steps than a small set gives at PEFT's usual 2e-4 (docs/benchmarks.md)."""
    assert [TrainSettings(task=k).learning_rate for k in ("generation", "seq_cls", "token_cls", "qa")] == [
        2e-4, 2e-4, 2e-4, 1e-3]
    assert TrainSettings.from_dict({"task": "qa"}).learning_rate == 1e-3
    assert TrainSettings.from_dict({"task": "qa", "learning_rate": 5e-5}).learning_rate == 5e-5
    assert TrainSettings.from_dict({"task": "qa", "learning_rate": 1}).learning_rate == 1.0
    assert TrainSettings.from_dict(TrainSettings(task="qa").to_dict()).learning_rate == 1e-3


def test_round_trip_through_dict():
    s = TrainSettings(rank=4, target_modules=("q_proj", "v_proj"), lr_scheduler="cosine")
    assert TrainSettings.from_dict(s.to_dict()) == s
    assert s.to_dict()["target_modules"] == ["q_proj", "v_proj"]


@pytest.mark.parametrize("field, value", [
    ("rank", 0), ("rank", 5000), ("rank", True), ("rank", "8"), ("rank", 2.5),
    ("alpha", 0), ("alpha", float("nan")),
    ("dropout", 1.0), ("dropout", -0.1),
    ("learning_rate", 0.0), ("learning_rate", 1.5), ("learning_rate", float("inf")),
    ("epochs", 0), ("max_steps", -1), ("batch_size", 0), ("gradient_accumulation_steps", 0),
    ("warmup_ratio", 1.0), ("warmup_ratio", -0.5),
    ("lr_scheduler", "step"), ("weight_decay", -0.1), ("max_grad_norm", -1.0), ("seed", -1),
    ("eval_fraction", 0.6), ("eval_steps", -1), ("early_stopping_patience", -2),
    ("max_length", 4), ("template", "jinja"), ("gradient_checkpointing", 1), ("bf16", "yes"),
    ("use_rslora", None), ("target_modules", ()), ("target_modules", ("q_proj", "")), ("task", ["qa"]),
])
def test_out_of_range_is_refused_with_the_field_name(field, value):
    with pytest.raises(InvalidArgument, match=field):
        TrainSettings.from_dict({field: value})


def test_range_message_states_the_range():
    with pytest.raises(InvalidArgument, match=r"dropout must be in \[0.0, 1.0\), got 1.5"):
        TrainSettings(dropout=1.5)


def test_unknown_keys_are_refused():
    with pytest.raises(InvalidArgument, match="rnak"):
        TrainSettings.from_dict({"rnak": 8})
    with pytest.raises(InvalidArgument):
        TrainSettings.from_dict(["rank", 8])


def test_loose_forms_are_normalised():
    s = TrainSettings.from_dict({"alpha": 32, "target_modules": "q_proj, v_proj", "weight_decay": 0})
    assert s.alpha == 32.0 and isinstance(s.alpha, float)
    assert s.target_modules == ("q_proj", "v_proj")
    assert TrainSettings(target_modules=["o_proj"]).target_modules == ("o_proj",)


def test_early_stopping_needs_an_eval_split():
    with pytest.raises(InvalidArgument, match="early_stopping_patience"):
        TrainSettings(early_stopping_patience=2, eval_fraction=0.0)
