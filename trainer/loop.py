"""Train one LoRA adapter on the shared, frozen base model.

The base model and its LoRA context belong to serving as much as to training, so every forward
pass here runs inside one device turn (core/model/turns.py), attaches the job's adapter to the
context only for that turn, and puts everything back afterwards: ctx.train, train/eval mode and
activation checkpointing. Between turns the model is exactly as serving left it.

NF4 on a CPU: the train/eval flip only picks the path, never the weights' layout. Training passes
run the base Linears by a differentiable dequantize; eval passes and serving run the kernel chosen at
load (packed AVX512-BF16 or generic), which stays in place across turns (core/model/bnb_cpu.py).

A run can be checkpointed and resumed (trainer.checkpoint): everything a step depends on is either
derived from the step number (the data order: a seeded shuffle per epoch; the learning rate) or kept
in the checkpoint (LoRA weights, AdamW state, the dropout RNG, evaluation tracking, counters), so a
resumed run takes the same steps on the same batches as one that never stopped.
"""

from __future__ import annotations

import collections
import contextlib
import math
import random
import threading
import time
from dataclasses import dataclass
from typing import Callable

import torch
from loraserve.core.errors import Cancelled, FailedPrecondition, InvalidArgument, LoraserveError
from loraserve.core.lora.layer import LoraContext, LoraLinear, TrainableLora
from loraserve.core.lora.weights import matches_target
from loraserve.core.model.load import BaseModel
from loraserve.core.tasks.heads import GENERATION, new_head
from loraserve.trainer.checkpoint import Checkpointing, TrainState
from loraserve.trainer.data import DataStats, PreparedData, TaskLabels, collate
from loraserve.trainer.events import (
    Completed,
    Evaluation,
    Progress,
    Started,
    TrainMetrics,
)
from loraserve.trainer.render import IGNORE
from loraserve.trainer.settings import TrainSettings
from loraserve.trainer.task_objective import (
    Predictions,
    collate_task,
    head_logits,
    loss_units,
    scalar_metrics,
    task_loss,
)
from torch import nn


class TrainingFailed(LoraserveError):
    """The run diverged (NaN or infinite loss or gradient); nothing was kept."""


class Suspended(Cancelled):
    """The run stopped on Checkpointing.suspend, after handing the state of its last whole step to
    Checkpointing.save: it can resume from there."""


class CheckpointMismatch(FailedPrecondition):
    """A checkpoint that belongs to another run (other settings, data or base model)."""


@dataclass
class TrainResult:
    metrics: TrainMetrics
    modules: dict[str, tuple[torch.Tensor, torch.Tensor]]
    """Per wrapped module name: A [r, in] and B [out, r], float32 on CPU, unscaled (PEFT's form)."""
    stats: DataStats
    data_hash: str
    started_at: float
    """Unix time."""
    finished_at: float
    head: tuple[torch.Tensor, torch.Tensor | None] | None = None
    """Task kinds: the head's (weight [labels, hidden], bias), float32 on CPU."""
    evaluation: dict | None = None
    """Task kinds: the full metrics report of the kept adapter's last evaluation (per class, confusion)."""
    task: TaskLabels | None = None
    """Task kinds: the label set the head was trained on."""


def select_modules(wrapped: dict[str, LoraLinear], targets) -> list[str]:
    """The wrapped module names that get LoRA; every target must match at least one of them."""
    targets = list(targets)
    missing = [t for t in targets if not any(matches_target(name, [t]) for name in wrapped)]
    if missing:
        have = sorted({name.rpartition(".")[2] for name in wrapped})
        raise InvalidArgument(f"target_modules {', '.join(missing)} match no layer of this model; "
                              f"it has {', '.join(have)}")
    return [name for name in wrapped if matches_target(name, targets)]


def new_lora(settings: TrainSettings, wrapped: dict[str, LoraLinear], names: list[str],
             device: torch.device) -> TrainableLora:
    """PEFT's initialisation: A kaiming-uniform, B zeros, so the adapter starts as a no-op."""
    lora = TrainableLora(rank=settings.rank, alpha=settings.alpha, dropout=settings.dropout,
                         targets=list(settings.target_modules), use_rslora=settings.use_rslora)
    # A private generator on CPU: the same seed gives the same adapter on any device, and the
    # process-wide RNG that serving samples from is left alone.
    generator = torch.Generator(device="cpu").manual_seed(settings.seed)
    for name in names:
        layer = wrapped[name]
        a = torch.empty(settings.rank, layer.in_features, dtype=torch.float32)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)
        key = TrainableLora.key(name)
        lora.a[key] = nn.Parameter(a.to(device))
        lora.b[key] = nn.Parameter(torch.zeros(layer.out_features, settings.rank, dtype=torch.float32, device=device))
    return lora


def lr_factor(step: int, warmup: int, total: int, scheduler: str) -> float:
    """Multiplier of the peak learning rate for optimizer step `step` (0-based)."""
    if step < warmup:
        return (step + 1) / (warmup + 1)  # never exactly 0: the first step must move
    if scheduler == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    if scheduler == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return max(0.0, 1.0 - progress)


def train_adapter(base: BaseModel, ctx: LoraContext, wrapped: dict[str, LoraLinear], settings: TrainSettings,
                  dataset: PreparedData, *, turns=None, cancel: threading.Event | None = None,
                  on_event: Callable[[object], None] | None = None,
                  checkpoints: Checkpointing | None = None) -> TrainResult:
    """Train; raises Cancelled when `cancel` is set, TrainingFailed on divergence, Suspended when
    checkpoints.suspend is set, CheckpointMismatch when checkpoints.resume is another run's."""
    if settings.max_length > base.context_window:
        raise InvalidArgument(f"max_length must be in [8, {base.context_window}] (the model's context window), "
                              f"got {settings.max_length}")
    if not dataset.train:
        raise InvalidArgument("the data set has no training examples")
    names = select_modules(wrapped, settings.target_modules)
    lora = new_lora(settings, wrapped, names, base.device)
    head = None
    if settings.task != GENERATION:
        if dataset.task is None:
            raise InvalidArgument(f"a {settings.task} adapter needs data prepared for it")
        generator = torch.Generator(device="cpu").manual_seed(settings.seed + 1)
        weight, bias = new_head(settings.task, len(dataset.task.labels), base.model.config.hidden_size, generator,
                                getattr(base.model.config, "initializer_range", 0.02))
        head = nn.ParameterDict({"weight": nn.Parameter(weight.to(base.device))})
        if bias is not None:
            head["bias"] = nn.Parameter(bias.to(base.device))
    return _Run(base, ctx, lora, names, settings, dataset, turns, cancel, on_event, checkpoints, head).run()


class _Run:
    def __init__(self, base, ctx, lora, names, settings, dataset, turns, cancel, on_event, checkpoints, head=None):
        self.base, self.ctx, self.lora, self.names, self.settings = base, ctx, lora, names, settings
        self.data = dataset
        self.head = head  # nn.ParameterDict (weight, bias) for the task kinds, None for generation
        self.kind = settings.task
        self.multi = dataset.task.multi_label if dataset.task is not None else False
        self.eval_metrics: dict[str, float] = {}
        self.eval_report: dict | None = None
        self.best_report: dict | None = None
        self.turns, self.cancel, self.on_event, self.checkpoints = turns, cancel, on_event, checkpoints
        self.pad_id = base.tokenizer.pad_token_id if base.tokenizer.pad_token_id is not None else 0
        batches = math.ceil(len(dataset.train) / settings.batch_size)
        self.steps_per_epoch = math.ceil(batches / settings.gradient_accumulation_steps)
        self.total_steps = settings.max_steps or settings.epochs * self.steps_per_epoch
        warmup = math.ceil(settings.warmup_ratio * self.total_steps)
        groups = [{"params": list(lora.parameters())}]
        if head is not None:
            groups.append({"params": list(head.parameters()), "lr": settings.head_learning_rate or settings.learning_rate})
        self.optimizer = torch.optim.AdamW(groups, lr=settings.learning_rate, weight_decay=settings.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, warmup, self.total_steps, settings.lr_scheduler))
        # The run's state after its last whole optimizer step (`done`): what a checkpoint holds.
        self.done = 0
        self.tokens = 0
        self.seconds = 0.0  # wall time of the sessions before a resume
        self.started_at: float | None = None
        # (loss sum, label tokens) of the last epoch's steps, for the final train_loss.
        self.recent: collections.deque[tuple[float, int]] = collections.deque(maxlen=self.steps_per_epoch)
        self.eval_loss: float | None = None
        self.eval_pending = False  # stopped in the evaluation after step `done`: a resumed run evaluates first
        self.best_score: float | None = None  # metric_for_best_model, or -eval_loss: higher is better
        self.best_eval_loss: float | None = None
        self.best_metrics: dict[str, float] = {}
        self.best_state: dict[str, torch.Tensor] | None = None
        self.bad_evals = 0
        self.rng = _seeded_rng(settings.seed, base.device)
        self._live_rng = self.rng
        if checkpoints is not None and checkpoints.resume is not None:
            self._restore(checkpoints.resume)

    def run(self) -> TrainResult:
        start = time.monotonic()
        self.started_at = self.started_at or time.time()
        self._emit(Started(self.total_steps, len(self.data.train), len(self.data.eval), self.data.stats.truncated))
        try:
            try:
                stopped_early = self._steps(start)
            except Suspended:
                self.checkpoints.save(self._train_state(self.seconds + time.monotonic() - start))
                raise
            if self.settings.early_stopping_patience and self.best_state is not None:
                self._restore_best()  # keep the adapter that evaluated best, not the last one
                self.eval_loss = self.best_eval_loss
                self.eval_metrics, self.eval_report = self.best_metrics, self.best_report
            seconds = self.seconds + time.monotonic() - start
            metrics = TrainMetrics(
                train_loss=sum(loss for loss, _ in self.recent) / sum(n for _, n in self.recent),
                eval_loss=self.eval_loss,
                perplexity=_perplexity(self.eval_loss) if self.eval_loss is not None else None,
                steps=self.done,
                tokens=self.tokens,
                seconds=seconds,
                tokens_per_second=self.tokens / seconds if seconds > 0 else 0.0,
                stopped_early=stopped_early,
                eval_metrics=dict(self.eval_metrics),
            )
            modules = {name: (self.lora.a[TrainableLora.key(name)].detach().cpu().clone(),
                              self.lora.b[TrainableLora.key(name)].detach().cpu().clone())
                       for name in self.names}
            head = None
            if self.head is not None:
                bias = self.head["bias"].detach().cpu().clone() if "bias" in self.head else None
                head = (self.head["weight"].detach().cpu().clone(), bias)
        finally:
            self._free()
        self._emit(Completed(metrics))
        return TrainResult(metrics=metrics, modules=modules, stats=self.data.stats, data_hash=self.data.data_hash,
                           started_at=self.started_at, finished_at=time.time(), head=head,
                           evaluation=self.eval_report, task=self.data.task)

    def _steps(self, start: float) -> bool:
        """Train from step `done` to the end; returns whether early stopping ended the run."""
        s, first, tokens_before = self.settings, self.done, self.tokens
        if self.eval_pending and self._evaluate_and_judge(self.done):
            return True
        groups = self._groups(self.done)
        while self.done < self.total_steps:
            step = self.done + 1
            lr = self.optimizer.param_groups[0]["lr"]
            loss_sum, labels, tokens = self._train_step(step, next(groups))
            self.done, self.tokens, self.rng = step, self.tokens + tokens, self._live_rng
            self.recent.append((loss_sum, labels))
            elapsed = time.monotonic() - start
            self._emit(Progress(step, self.total_steps, round(step / self.steps_per_epoch, 4), loss_sum / labels,
                                lr, (self.tokens - tokens_before) / elapsed,
                                elapsed / (step - first) * (self.total_steps - step)))
            every = s.eval_steps or self.steps_per_epoch
            if self.data.eval and (step % every == 0 or step == self.total_steps):
                if self._evaluate_and_judge(step):
                    return True
            c = self.checkpoints
            if c is not None and c.every_steps and step % c.every_steps == 0 and step < self.total_steps:
                c.save(self._train_state(self.seconds + time.monotonic() - start))
        return False

    def _groups(self, start: int):
        """Endless (micro-batch lists per optimizer step) from step `start` on. A new seeded shuffle every
        epoch, so the batches of any step follow from its number: a resumed run skips to its place."""
        s = self.settings
        n, per_step = len(self.data.train), s.gradient_accumulation_steps
        epoch, skip = divmod(start, self.steps_per_epoch)
        while True:
            order = list(range(n))
            random.Random(f"{s.seed}:{epoch}").shuffle(order)
            batches = [order[i:i + s.batch_size] for i in range(0, n, s.batch_size)]
            for g in range(skip * per_step, len(batches), per_step):
                yield [[self.data.train[i] for i in b] for b in batches[g:g + per_step]]
            epoch, skip = epoch + 1, 0

    def _train_step(self, step: int, group) -> tuple[float, int, int]:
        """One optimizer step over its micro-batches; returns (summed token loss, label tokens, tokens)."""
        batches = [self._collate(b) for b in group]
        # Normalise by the whole step's label tokens (examples, for most task kinds), so accumulation
        # equals one large batch.
        labels = max(1, sum(self._units(b) for b in batches))
        loss_sum, tokens = 0.0, 0
        self._live_rng = self.rng
        for k, batch in enumerate(batches):
            self._check_stop(step)
            with self._turn(), self._attached(training=True), self._own_rng():
                loss = self._loss(batch)
                value = loss.item()
                if not math.isfinite(value):
                    raise TrainingFailed(f"the training loss became {value} at step {step}: "
                                         "lower learning_rate or check the data")
                (loss / labels).backward()
                loss_sum += value
                tokens += int(batch["attention_mask"].sum())
                if k == len(batches) - 1:
                    self._optimizer_step(step)
        return loss_sum, labels, tokens

    def _collate(self, items) -> dict[str, torch.Tensor]:
        if self.head is None:
            return collate(items, self.pad_id)
        return collate_task(items, self.pad_id, self.kind, self.multi)

    def _units(self, batch) -> int:
        if self.head is None:
            return int((batch["labels"][:, 1:] != IGNORE).sum())
        return loss_units(batch, self.kind)

    def _optimizer_step(self, step: int) -> None:
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        norm = nn.utils.clip_grad_norm_(params, self.settings.max_grad_norm or float("inf"))
        if not torch.isfinite(norm):
            raise TrainingFailed(f"the gradient became {float(norm)} at step {step}: lower learning_rate")
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def _evaluate_and_judge(self, step: int) -> bool:
        """Evaluate after `step` and track the best score (metric_for_best_model, else the eval loss);
        returns whether early stopping ends the run."""
        self.eval_pending = True
        self.eval_loss = self._evaluate(step)
        self.eval_pending = False
        metric = self.settings.metric_for_best_model
        score = self.eval_metrics[metric] if metric else -self.eval_loss
        if self._improved(score):
            self.bad_evals = 0
            return False
        self.bad_evals += 1
        patience = self.settings.early_stopping_patience
        return bool(patience) and self.bad_evals >= patience

    def _evaluate(self, step: int) -> float:
        total, labels = 0.0, 0
        size = self.settings.batch_size
        s = self.settings
        predictions = (Predictions(self.kind, self.data.task.labels, self.multi, s.threshold, s.max_answer_tokens)
                       if self.head is not None else None)
        for i in range(0, len(self.data.eval), size):
            self._check_stop(step)
            items = self.data.eval[i:i + size]
            batch = self._collate(items)
            with self._turn(), self._attached(training=False), torch.no_grad():
                if predictions is None:
                    total += self._loss(batch).item()
                else:
                    logits = self._head_logits(batch)
                    total += task_loss(logits, batch, self.kind, self.multi).item()
                    predictions.add(items, logits)
            labels += self._units(batch)
        loss = total / max(1, labels)
        if not math.isfinite(loss):
            raise TrainingFailed(f"the eval loss became {loss} at step {step}: lower learning_rate")
        if predictions is not None:
            self.eval_report = predictions.report(self.data.eval_examples)
            self.eval_metrics = scalar_metrics(self.eval_report)
        self._emit(Evaluation(step, loss, _perplexity(loss), dict(self.eval_metrics)))
        return loss

    def _head_logits(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The task head over the backbone's final hidden states (the LM head is never computed)."""
        device = self.base.device
        out = self.base.model.model(input_ids=batch["input_ids"].to(device),
                                    attention_mask=batch["attention_mask"].to(device), use_cache=False)
        return head_logits(out.last_hidden_state, batch, self.kind, self.head["weight"], self.head.get("bias"))

    def _loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Summed cross-entropy over the learned tokens (each predicted from the position before it);
        for a task kind, the head's summed loss over its units."""
        if self.head is not None:
            return task_loss(self._head_logits(batch), batch, self.kind, self.multi)
        device = self.base.device
        out = self.base.model(input_ids=batch["input_ids"].to(device),
                              attention_mask=batch["attention_mask"].to(device), use_cache=False)
        labels = batch["labels"][:, 1:].to(device)
        keep = labels != IGNORE
        # Only learned positions go to float32: the full [batch, length, vocab] logits would double memory.
        logits = out.logits[:, :-1][keep].float()
        return nn.functional.cross_entropy(logits, labels[keep], reduction="sum")

    @contextlib.contextmanager
    def _attached(self, training: bool):
        """The adapter on the shared model for one turn; the model's own state restored after it."""
        model = self.base.model
        was_training = model.training
        checkpoint = training and self.settings.gradient_checkpointing and not _checkpointing_on(model)
        autocast = (torch.autocast("cuda", dtype=torch.bfloat16)
                    if self.settings.bf16 and self.base.device.type == "cuda" else contextlib.nullcontext())
        self.ctx.train = self.lora
        try:
            model.train(training)  # LoRA dropout follows the module's training flag
            if checkpoint:
                _set_checkpointing(model, True)
            with autocast:
                yield
        finally:
            if checkpoint:
                _set_checkpointing(model, False)
            model.train(was_training)
            self.ctx.train = None

    @contextlib.contextmanager
    def _own_rng(self):
        """Dropout draws from the run's own random stream, swapped in for the turn: the same seed gives
        the same run whatever trains beside it, and a checkpoint can hold the stream's position.
        Nothing else draws from the process-wide generators while a turn holds the device (serving's
        sampling keeps no RNG state)."""
        cuda = self.base.device.type == "cuda"
        with torch.random.fork_rng(devices=[self.base.device] if cuda else [], device_type="cuda" if cuda else None):
            torch.set_rng_state(self._live_rng["cpu"])
            if cuda:
                torch.cuda.set_rng_state(self._live_rng["cuda"], self.base.device)
            yield
            self._live_rng = {"cpu": torch.get_rng_state(),
                              **({"cuda": torch.cuda.get_rng_state(self.base.device)} if cuda else {})}

    def _turn(self):
        return self.turns.turn() if self.turns is not None else contextlib.nullcontext()

    def _check_stop(self, step: int) -> None:
        if self.checkpoints is not None and self.checkpoints.suspend.is_set():
            raise Suspended(f"training suspended after step {self.done} of {self.total_steps}")
        if self.cancel is not None and self.cancel.is_set():
            raise Cancelled(f"training cancelled at step {step} of {self.total_steps}")

    def _improved(self, score: float) -> bool:
        """Higher is better: metric_for_best_model, or the negated eval loss."""
        if self.best_score is not None and score <= self.best_score:
            return False
        self.best_score = score
        self.best_eval_loss, self.best_metrics, self.best_report = self.eval_loss, self.eval_metrics, self.eval_report
        if self.settings.early_stopping_patience:
            self.best_state = {k: p.detach().clone() for k, p in self._state().items()}
        return True

    def _restore_best(self) -> None:
        with torch.no_grad():
            for k, p in self._state().items():
                p.copy_(self.best_state[k])

    def _state(self) -> dict[str, nn.Parameter]:
        head = {"head." + k: p for k, p in self.head.items()} if self.head is not None else {}
        return {**{"a." + k: p for k, p in self.lora.a.items()}, **{"b." + k: p for k, p in self.lora.b.items()},
                **head}

    # --- checkpoints ------------------------------------------------------------------------------

    def _identity(self) -> dict:
        """What a checkpoint must match to be resumed by this run."""
        return {"settings": self.settings.to_dict(), "data_sha256": self.data.data_hash,
                "base_model": self.base.fingerprint, "total_steps": self.total_steps,
                "steps_per_epoch": self.steps_per_epoch}

    def _train_state(self, seconds: float) -> TrainState:
        """The state after step `done` (a stop mid-step leaves weights and optimizer as that step began)."""
        params = self._state()
        names = {id(p): name for name, p in params.items()}
        tensors = {f"lora.{name}": p.detach() for name, p in params.items()}
        for p, state in self.optimizer.state.items():
            for key, value in state.items():  # AdamW: step, exp_avg, exp_avg_sq
                tensors[f"adam.{key}.{names[id(p)]}"] = value
        for name, t in (self.best_state or {}).items():
            tensors[f"best.{name}"] = t
        for device, state in self.rng.items():
            tensors[f"rng.{device}"] = state
        tensors["recent.loss"] = torch.tensor([loss for loss, _ in self.recent], dtype=torch.float64)
        tensors["recent.labels"] = torch.tensor([n for _, n in self.recent], dtype=torch.int64)
        info = {"step": self.done, "tokens": self.tokens, "seconds": seconds, "started_at": self.started_at,
                "eval_loss": self.eval_loss, "eval_pending": self.eval_pending, "best_score": self.best_score,
                "best_eval_loss": self.best_eval_loss, "best_metrics": self.best_metrics,
                "eval_metrics": self.eval_metrics, "eval_report": self.eval_report, "best_report": self.best_report,
                "bad_evals": self.bad_evals, "run": self._identity()}
        return TrainState(tensors, info)

    def _restore(self, state: TrainState) -> None:
        info, tensors = state.info, state.tensors
        run = info.get("run") or {}
        differ = [key for key, value in self._identity().items() if run.get(key) != value]
        params = self._state()
        if not differ and any(tensors.get(f"lora.{name}", torch.empty(0)).shape != p.shape
                              for name, p in params.items()):
            differ = ["LoRA weights"]
        if differ:
            raise CheckpointMismatch(f"the checkpoint at step {state.step} belongs to another run (its "
                                     f"{', '.join(differ)} differ): it cannot be resumed here")
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(tensors[f"lora.{name}"])
        index = {id(p): i for i, p in enumerate(self.optimizer.param_groups[0]["params"])}
        saved = self.optimizer.state_dict()
        for key, value in tensors.items():
            if key.startswith("adam."):
                field, _, name = key.removeprefix("adam.").partition(".")
                saved["state"].setdefault(index[id(params[name])], {})[field] = value
        self.optimizer.load_state_dict(saved)  # moves the moments onto the parameters' device
        # The learning rate LambdaLR would have set after `step` steps (set after the load, which resets it).
        self.scheduler.last_epoch = state.step
        for group, base_lr, factor in zip(self.optimizer.param_groups, self.scheduler.base_lrs,
                                          self.scheduler.lr_lambdas):
            group["lr"] = base_lr * factor(state.step)
        best = {key.removeprefix("best."): t.to(self.base.device) for key, t in tensors.items()
                if key.startswith("best.")}
        self.best_state = best or None
        self.rng = {device: tensors.get(f"rng.{device}", seeded) for device, seeded in self.rng.items()}
        self._live_rng = self.rng
        self.recent.extend(zip(tensors["recent.loss"].tolist(), tensors["recent.labels"].tolist()))
        self.done, self.tokens, self.seconds = state.step, info["tokens"], info["seconds"]
        self.started_at = info["started_at"]
        self.eval_loss, self.eval_pending = info["eval_loss"], info["eval_pending"]
        self.best_score, self.bad_evals = info["best_score"], info["bad_evals"]
        self.best_eval_loss, self.best_metrics = info["best_eval_loss"], info["best_metrics"]
        self.eval_metrics, self.eval_report, self.best_report = (info["eval_metrics"], info["eval_report"],
                                                                 info["best_report"])

    def _emit(self, event) -> None:
        if self.on_event is not None:
            self.on_event(event)

    def _free(self) -> None:
        """Drop optimizer state and device copies now, not when the caller drops the exception."""
        self.optimizer.state.clear()
        self.optimizer.param_groups.clear()
        self.lora.a.clear()
        self.lora.b.clear()
        if self.head is not None:
            self.head.clear()
        self.best_state = None


def _seeded_rng(seed: int, device: torch.device) -> dict[str, torch.Tensor]:
    """The dropout stream's start: the settings' seed, on the CPU and on the training device."""
    state = {"cpu": torch.Generator().manual_seed(seed).get_state()}
    if device.type == "cuda":
        state["cuda"] = torch.Generator(device=device).manual_seed(seed).get_state()
    return state


def _perplexity(loss: float) -> float:
    return math.exp(loss) if loss < 700 else float("inf")


def _checkpointing_on(model) -> bool:
    return any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules())


def _set_checkpointing(model, on: bool) -> None:
    # transformers renamed these to activation_checkpointing_* (the old names warn); support both.
    if on:
        enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        enable({"use_reentrant": False})
    else:
        disable = getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable
        disable()
        # Enabling adds a hook making embedding outputs require grad; serving under inference_mode
        # must not see it.
        model.disable_input_require_grads()
