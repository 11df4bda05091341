"""Training hyper-parameters for one adapter: the usual LoRA / QLoRA defaults, validated up front.

Every check raises InvalidArgument naming the setting and its allowed range, so a bad Train request
or CLI flag fails before the model is touched.
"""

from __future__ import annotations

import math
from dataclasses import Field, asdict, dataclass, fields

from loraserve.core.errors import InvalidArgument
from loraserve.core.lora.layer import DEFAULT_TARGETS
from loraserve.core.tasks.heads import GENERATION, KINDS, QA, SEQ_CLS, TOKEN_CLS

# LoraCacheConfig accepts --max-lora-rank up to this; a serving server may allow less.
MAX_RANK = 1024
SCHEDULERS = ("linear", "cosine", "constant")
TEMPLATES = ("auto", "chat", "plain")
DEFAULT_LEARNING_RATE = {None: 2e-4, QA: 1e-3}  # by task kind; None: every other kind
_FIELD_TYPES = {"target_modules": tuple, "labels": tuple, "learning_rate": float}
METRICS = {GENERATION: (), SEQ_CLS: ("accuracy", "macro_f1", "weighted_f1", "micro_f1", "subset_accuracy"),
           TOKEN_CLS: ("entity_f1", "entity_precision", "entity_recall", "token_accuracy"),
           QA: ("exact_match", "f1")}
"""What metric_for_best_model may name, per task (multi-label: macro_f1, micro_f1, subset_accuracy)."""


@dataclass(frozen=True)
class TrainSettings:
    rank: int = 8
    """LoRA rank r: rows of A / columns of B per targeted module."""
    alpha: float = 16.0
    """LoRA alpha; the update is scaled by alpha / r (alpha / sqrt(r) with use_rslora)."""
    dropout: float = 0.05
    """Dropout on the LoRA input during training, in [0, 1)."""
    target_modules: tuple[str, ...] = DEFAULT_TARGETS
    """Module name suffixes that get LoRA (PEFT's matching): all attention and MLP projections."""
    use_rslora: bool = False
    """Rank-stabilised scaling alpha / sqrt(r) instead of alpha / r."""
    learning_rate: float | None = None
    """Peak AdamW learning rate, in (0, 1]. Unset: the task kind's (DEFAULT_LEARNING_RATE): 2e-4,
    PEFT's usual rate, and 1e-3 for qa, whose start/end heads need more steps than the others get
    from a small set (docs/benchmarks.md: 160 SQuAD-style examples, 3 epochs, held-out F1 0.28 at
    2e-4 and 0.89 at 1e-3; 500 examples 0.90 and 0.94)."""
    epochs: int = 3
    """Passes over the training split; ignored when max_steps > 0."""
    max_steps: int = 0
    """Optimizer steps to run; 0 means run `epochs` passes."""
    batch_size: int = 4
    """Examples per micro-batch (one forward + backward)."""
    gradient_accumulation_steps: int = 1
    """Micro-batches per optimizer step; the effective batch is batch_size times this."""
    warmup_ratio: float = 0.03
    """Fraction of the optimizer steps spent ramping the learning rate up from 0, in [0, 1)."""
    lr_scheduler: str = "linear"
    """Learning-rate decay after warmup: linear (to 0), cosine (to 0) or constant."""
    weight_decay: float = 0.0
    """AdamW decoupled weight decay on the LoRA weights, >= 0."""
    max_grad_norm: float = 1.0
    """Clip the gradient's global L2 norm to this; 0 disables clipping."""
    seed: int = 42
    """Seeds the LoRA initialisation, the train/eval split, the per-epoch shuffle and the dropout masks."""
    eval_fraction: float = 0.1
    """Share of the examples held out for evaluation, in [0, 0.5]; 0 disables evaluation."""
    eval_steps: int = 0
    """Evaluate every this many optimizer steps; 0 evaluates once per epoch (and always at the end)."""
    early_stopping_patience: int = 0
    """Stop after this many evaluations without a better eval loss (best weights kept); 0 is off."""
    max_length: int = 512
    """Longest example in tokens; longer ones are cut at the end (see trainer.data)."""
    template: str = "auto"
    """How prompt/completion examples are rendered: chat (the tokenizer's chat template, prompt as the
    user turn, completion as the assistant turn), plain (prompt + completion concatenated), or auto
    (chat when the tokenizer has a chat template, else plain). "messages" examples always use chat."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass: less memory, about a third slower."""
    bf16: bool = True
    """bfloat16 autocast for the forward pass; applies on CUDA only (CPU stays float32)."""
    task: str = GENERATION
    """What the adapter does: generation (a causal-LM LoRA), seq_cls (sequence classification, one
    label or several), token_cls (entity tagging, BIO tags per word) or qa (extractive question
    answering). The last three train a head on the backbone beside the LoRA (PEFT's modules_to_save)."""
    labels: tuple[str, ...] = ()
    """seq_cls: the label names; token_cls: the BIO tags (O, B-PER, I-PER, ...). Empty: the labels the
    data uses, sorted (tags: O first, then B-/I- per type). Data labels outside a given set are refused."""
    threshold: float = 0.5
    """Multi-label classification: a label is predicted when its probability reaches this, in (0, 1)."""
    repeat_input: bool = True
    """token_cls: feed the words twice and tag the second copy, whose tokens have read the whole
    sentence (a decoder's first copy has seen only the words before each token)."""
    doc_stride: int = 128
    """qa: tokens shared by consecutive windows of a context longer than max_length."""
    max_answer_tokens: int = 30
    """qa: the longest answer span considered, in tokens."""
    head_learning_rate: float = 2e-3
    """Peak learning rate of a task kind's head; 0 uses learning_rate. The head starts random while the
    LoRA starts as a no-op, and at the LoRA's rate (PEFT's recipe) it is the slow part: on generated
    sentiment data (256 examples, 2 epochs, SmolLM2-135M) held-out accuracy went 0.81 -> 0.92."""
    metric_for_best_model: str = ""
    """The evaluation metric early stopping and the best checkpoint follow (higher is better), e.g.
    accuracy, macro_f1, micro_f1, entity_f1, exact_match, f1; empty: the eval loss (lower is better)."""

    def __post_init__(self):
        if self.learning_rate is None:
            object.__setattr__(self, "learning_rate", default_learning_rate(self.task))
        if isinstance(self.labels, str):  # the CLI's comma-separated form
            object.__setattr__(self, "labels", tuple(x.strip() for x in self.labels.split(",") if x.strip()))
        elif isinstance(self.labels, list):
            object.__setattr__(self, "labels", tuple(self.labels))
        if isinstance(self.target_modules, str):
            # A comma-separated string is what the CLI and loose JSON give; store the tuple.
            object.__setattr__(self, "target_modules", tuple(t.strip() for t in self.target_modules.split(",")))
        elif isinstance(self.target_modules, list):
            object.__setattr__(self, "target_modules", tuple(self.target_modules))
        self._check_types()
        _in_range("rank", self.rank, 1, MAX_RANK)
        _positive("alpha", self.alpha)
        _in_range("dropout", self.dropout, 0.0, 1.0, high_open=True)
        if not self.target_modules or not all(isinstance(t, str) and t for t in self.target_modules):
            raise InvalidArgument("target_modules must be a non-empty list of module names (e.g. q_proj,v_proj)")
        _in_range("learning_rate", self.learning_rate, 0.0, 1.0, low_open=True)
        _in_range("epochs", self.epochs, 1, 1000)
        _in_range("max_steps", self.max_steps, 0, 10_000_000)
        _in_range("batch_size", self.batch_size, 1, 4096)
        _in_range("gradient_accumulation_steps", self.gradient_accumulation_steps, 1, 4096)
        _in_range("warmup_ratio", self.warmup_ratio, 0.0, 1.0, high_open=True)
        _one_of("lr_scheduler", self.lr_scheduler, SCHEDULERS)
        _in_range("weight_decay", self.weight_decay, 0.0, 1.0)
        _in_range("max_grad_norm", self.max_grad_norm, 0.0, 1e6)
        _in_range("seed", self.seed, 0, 2**63 - 1)
        _in_range("eval_fraction", self.eval_fraction, 0.0, 0.5)
        _in_range("eval_steps", self.eval_steps, 0, 10_000_000)
        _in_range("early_stopping_patience", self.early_stopping_patience, 0, 10_000)
        if self.early_stopping_patience and self.eval_fraction == 0:
            raise InvalidArgument("early_stopping_patience needs evaluation: set eval_fraction > 0")
        _in_range("max_length", self.max_length, 8, 1_048_576)
        _one_of("template", self.template, TEMPLATES)
        _one_of("task", self.task, KINDS)
        if not all(isinstance(x, str) and 0 < len(x) <= 128 for x in self.labels) or len(self.labels) > 4096 \
                or len(set(self.labels)) != len(self.labels):
            raise InvalidArgument("labels must be at most 4096 distinct names of 1 to 128 characters")
        if self.labels and self.task in (GENERATION, QA):
            raise InvalidArgument(f"labels apply to seq_cls and token_cls adapters, not {self.task}")
        _in_range("threshold", self.threshold, 0.0, 1.0, low_open=True, high_open=True)
        _in_range("doc_stride", self.doc_stride, 0, 1_048_576)
        if self.task == QA and self.doc_stride >= self.max_length // 2:
            raise InvalidArgument(f"doc_stride must be below half of max_length ({self.max_length // 2}), "
                                  f"got {self.doc_stride}")
        _in_range("max_answer_tokens", self.max_answer_tokens, 1, 1_048_576)
        _in_range("head_learning_rate", self.head_learning_rate, 0.0, 1.0)
        if self.metric_for_best_model and self.metric_for_best_model not in METRICS[self.task]:
            allowed = ", ".join(METRICS[self.task]) or "none (generation follows the eval loss)"
            raise InvalidArgument(f"metric_for_best_model {self.metric_for_best_model!r} is not a {self.task} "
                                  f"metric; one of: {allowed}")

    def _check_types(self):
        for f in fields(self):
            value = getattr(self, f.name)
            expected = setting_type(f)
            if expected is float and isinstance(value, int) and not isinstance(value, bool):
                object.__setattr__(self, f.name, float(value))  # JSON and CLI give 16 for 16.0
                continue
            # bool is an int subclass: reject True as a rank, and 1 as a flag.
            if not isinstance(value, expected) or (expected is not bool and isinstance(value, bool)):
                raise InvalidArgument(f"{f.name} must be {expected.__name__}, got {type(value).__name__} {value!r}")

    @classmethod
    def from_dict(cls, values: dict) -> "TrainSettings":
        """Settings from a request or JSON object; unknown keys are refused (a typo must not be ignored)."""
        if not isinstance(values, dict):
            raise InvalidArgument("training settings must be an object of setting: value")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise InvalidArgument(f"unknown training setting(s) {', '.join(unknown)}; "
                                  f"known: {', '.join(sorted(known))}")
        return cls(**values)

    def to_dict(self) -> dict:
        out = asdict(self)
        out["target_modules"] = list(self.target_modules)
        out["labels"] = list(self.labels)
        return out

    def task_input(self) -> dict:
        """The input options of the task kind (core.tasks.inputs), recorded with the adapter."""
        if self.task == TOKEN_CLS:
            return {"repeat": self.repeat_input}
        if self.task == QA:
            return {"doc_stride": self.doc_stride, "max_answer_tokens": self.max_answer_tokens}
        return {}


def setting_type(f: Field) -> type:
    """The type a setting's value has once constructed (its default's type, unless the default is None
    or the field holds a tuple)."""
    return _FIELD_TYPES.get(f.name) or type(f.default)


def default_learning_rate(task) -> float:
    """The kind's rate; anything not a kind (refused later, with its field named) gets the common one."""
    return DEFAULT_LEARNING_RATE.get(task if isinstance(task, str) else None, DEFAULT_LEARNING_RATE[None])


def _in_range(name, value, low, high, low_open=False, high_open=False):
    if isinstance(value, float) and not math.isfinite(value):
        raise InvalidArgument(f"{name} must be a finite number, got {value}")
    bad_low = value <= low if low_open else value < low
    bad_high = value >= high if high_open else value > high
    if bad_low or bad_high:
        lo, hi = ("(" if low_open else "["), (")" if high_open else "]")
        raise InvalidArgument(f"{name} must be in {lo}{low}, {high}{hi}, got {value}")


def _positive(name, value):
    if not math.isfinite(value) or value <= 0:
        raise InvalidArgument(f"{name} must be > 0, got {value}")


def _one_of(name, value, allowed):
    if value not in allowed:
        raise InvalidArgument(f"{name} must be one of {', '.join(allowed)}, got {value!r}")
