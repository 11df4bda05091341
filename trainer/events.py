"""What a training run reports while it runs; callers (job manager, CLI) map these to their own form."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass(frozen=True)
class TrainMetrics:
    train_loss: float
    """Mean token loss over the last pass through the training data (the last steps_per_epoch steps)."""
    eval_loss: float | None
    """Mean token loss on the held-out split (the best one when early stopping is on); None without one."""
    perplexity: float | None
    """exp(eval_loss)."""
    steps: int
    """Optimizer steps taken."""
    tokens: int
    """Non-padding tokens trained on (forward + backward), all epochs."""
    seconds: float
    """Wall time of the run, evaluations and waits for the device included."""
    tokens_per_second: float
    stopped_early: bool
    eval_metrics: dict[str, float] = field(default_factory=dict)
    """Task kinds: the kept adapter's evaluation metrics (accuracy, macro_f1, entity_f1, exact_match, ...)."""

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Started:
    total_steps: int
    train_examples: int
    eval_examples: int
    truncated: int
    """Examples cut to max_length."""


@dataclass(frozen=True)
class Progress:
    step: int
    """Optimizer steps done, 1..total_steps."""
    total_steps: int
    epoch: float
    """Passes over the training data so far (2.5 is halfway through the third)."""
    loss: float
    """Mean token loss of this step's micro-batches."""
    learning_rate: float
    """The rate this step used."""
    tokens_per_second: float
    eta_seconds: float


@dataclass(frozen=True)
class Evaluation:
    step: int
    eval_loss: float
    perplexity: float
    metrics: dict[str, float] = field(default_factory=dict)
    """Task kinds: accuracy, precision/recall/F1 (macro, per entity, ...), exact match: see
    trainer.task_metrics; empty for generation."""


@dataclass(frozen=True)
class Completed:
    metrics: TrainMetrics


Event = Started | Progress | Evaluation | Completed
