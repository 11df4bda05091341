"""Train one LoRA adapter on the shared, frozen base model.

The base model and its LoRA context belong to serving as much as to training, so every forward
pass here runs inside one device turn (core/model/turns.py), attaches the job's adapter to the
context only for that turn, and puts everything back afterwards: ctx.train, train/eval mode and
activation checkpointing. Between turns the model is exactly as serving left it.

NF4 on a CPU: the train/eval flip only picks the path, never the weights' layout. Training passes
run the base Linears by a differentiable dequantize; eval passes and serving run the kernel chosen at
load (packed AVX512-BF16 or generic), which stays in place across turns (core/model/bnb_cpu.py).
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
from loraserve.core.errors import Cancelled, InvalidArgument, LoraserveError
from loraserve.core.lora.layer import LoraContext, LoraLinear, TrainableLora
from loraserve.core.lora.weights import matches_target
from loraserve.core.model.load import BaseModel
from loraserve.trainer.data import DataStats, PreparedData, collate
from loraserve.trainer.events import (
    Completed,
    Evaluation,
    Progress,
    Started,
    TrainMetrics,
)
from loraserve.trainer.render import IGNORE
from loraserve.trainer.settings import TrainSettings
from torch import nn


class TrainingFailed(LoraserveError):
    """The run diverged (NaN or infinite loss or gradient); nothing was kept."""


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
                  on_event: Callable[[object], None] | None = None) -> TrainResult:
    """Train; raises Cancelled when `cancel` is set, TrainingFailed on divergence."""
    if settings.max_length > base.context_window:
        raise InvalidArgument(f"max_length must be in [8, {base.context_window}] (the model's context window), "
                              f"got {settings.max_length}")
    if not dataset.train:
        raise InvalidArgument("the data set has no training examples")
    names = select_modules(wrapped, settings.target_modules)
    lora = new_lora(settings, wrapped, names, base.device)
    return _Run(base, ctx, lora, names, settings, dataset, turns, cancel, on_event).run()


class _Run:
    def __init__(self, base, ctx, lora, names, settings, dataset, turns, cancel, on_event):
        self.base, self.ctx, self.lora, self.names, self.settings = base, ctx, lora, names, settings
        self.data = dataset
        self.turns, self.cancel, self.on_event = turns, cancel, on_event
        self.pad_id = base.tokenizer.pad_token_id if base.tokenizer.pad_token_id is not None else 0
        batches = math.ceil(len(dataset.train) / settings.batch_size)
        self.steps_per_epoch = math.ceil(batches / settings.gradient_accumulation_steps)
        self.total_steps = settings.max_steps or settings.epochs * self.steps_per_epoch
        warmup = math.ceil(settings.warmup_ratio * self.total_steps)
        self.optimizer = torch.optim.AdamW(lora.parameters(), lr=settings.learning_rate,
                                           weight_decay=settings.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, warmup, self.total_steps, settings.lr_scheduler))
        self.tokens = 0
        self.best_loss: float | None = None
        self.best_state: dict[str, torch.Tensor] | None = None

    def run(self) -> TrainResult:
        started_at, start = time.time(), time.monotonic()
        s = self.settings
        self._emit(Started(self.total_steps, len(self.data.train), len(self.data.eval), self.data.stats.truncated))
        recent = collections.deque(maxlen=self.steps_per_epoch)  # (loss sum, label tokens) per step
        eval_loss, stopped_early, bad_evals, step = None, False, 0, 0
        try:
            groups = self._groups()
            for step in range(1, self.total_steps + 1):
                lr = self.optimizer.param_groups[0]["lr"]
                loss_sum, labels = self._train_step(step, next(groups))
                recent.append((loss_sum, labels))
                elapsed = time.monotonic() - start
                self._emit(Progress(step, self.total_steps, round(step / self.steps_per_epoch, 4), loss_sum / labels,
                                    lr, self.tokens / elapsed, elapsed / step * (self.total_steps - step)))
                every = s.eval_steps or self.steps_per_epoch
                if self.data.eval and (step % every == 0 or step == self.total_steps):
                    eval_loss = self._evaluate(step)
                    if self._improved(eval_loss):
                        bad_evals = 0
                    else:
                        bad_evals += 1
                        if s.early_stopping_patience and bad_evals >= s.early_stopping_patience:
                            stopped_early = True
                            break
            if s.early_stopping_patience and self.best_state is not None:
                self._restore_best()  # keep the adapter that evaluated best, not the last one
                eval_loss = self.best_loss
            seconds = time.monotonic() - start
            metrics = TrainMetrics(
                train_loss=sum(loss for loss, _ in recent) / sum(n for _, n in recent),
                eval_loss=eval_loss,
                perplexity=_perplexity(eval_loss) if eval_loss is not None else None,
                steps=step,
                tokens=self.tokens,
                seconds=seconds,
                tokens_per_second=self.tokens / seconds if seconds > 0 else 0.0,
                stopped_early=stopped_early,
            )
            modules = {name: (self.lora.a[TrainableLora.key(name)].detach().cpu().clone(),
                              self.lora.b[TrainableLora.key(name)].detach().cpu().clone())
                       for name in self.names}
        finally:
            self._free()
        self._emit(Completed(metrics))
        return TrainResult(metrics=metrics, modules=modules, stats=self.data.stats, data_hash=self.data.data_hash,
                           started_at=started_at, finished_at=time.time())

    def _groups(self):
        """Endless (micro-batch lists per optimizer step); a new seeded shuffle every epoch."""
        s = self.settings
        n = len(self.data.train)
        epoch = 0
        while True:
            order = list(range(n))
            random.Random(f"{s.seed}:{epoch}").shuffle(order)
            batches = [order[i:i + s.batch_size] for i in range(0, n, s.batch_size)]
            for g in range(0, len(batches), s.gradient_accumulation_steps):
                yield [[self.data.train[i] for i in b] for b in batches[g:g + s.gradient_accumulation_steps]]
            epoch += 1

    def _train_step(self, step: int, group) -> tuple[float, int]:
        """One optimizer step over its micro-batches; returns (summed token loss, label tokens)."""
        batches = [collate(b, self.pad_id) for b in group]
        # Normalise by the whole step's label tokens, so accumulation equals one large batch.
        labels = sum(int((b["labels"][:, 1:] != IGNORE).sum()) for b in batches)
        loss_sum = 0.0
        for k, batch in enumerate(batches):
            self._check_cancel(step)
            with self._turn(), self._attached(training=True):
                loss = self._loss(batch)
                value = loss.item()
                if not math.isfinite(value):
                    raise TrainingFailed(f"the training loss became {value} at step {step}: "
                                         "lower learning_rate or check the data")
                (loss / labels).backward()
                loss_sum += value
                self.tokens += int(batch["attention_mask"].sum())
                if k == len(batches) - 1:
                    self._optimizer_step(step)
        return loss_sum, labels

    def _optimizer_step(self, step: int) -> None:
        params = self.lora.parameters()
        norm = nn.utils.clip_grad_norm_(params, self.settings.max_grad_norm or float("inf"))
        if not torch.isfinite(norm):
            raise TrainingFailed(f"the gradient became {float(norm)} at step {step}: lower learning_rate")
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def _evaluate(self, step: int) -> float:
        total, labels = 0.0, 0
        size = self.settings.batch_size
        for i in range(0, len(self.data.eval), size):
            self._check_cancel(step)
            batch = collate(self.data.eval[i:i + size], self.pad_id)
            with self._turn(), self._attached(training=False), torch.no_grad():
                total += self._loss(batch).item()
            labels += int((batch["labels"][:, 1:] != IGNORE).sum())
        loss = total / labels
        if not math.isfinite(loss):
            raise TrainingFailed(f"the eval loss became {loss} at step {step}: lower learning_rate")
        self._emit(Evaluation(step, loss, _perplexity(loss)))
        return loss

    def _loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Summed cross-entropy over the learned tokens (each predicted from the position before it)."""
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

    def _turn(self):
        return self.turns.turn() if self.turns is not None else contextlib.nullcontext()

    def _check_cancel(self, step: int) -> None:
        if self.cancel is not None and self.cancel.is_set():
            raise Cancelled(f"training cancelled at step {step} of {self.total_steps}")

    def _improved(self, loss: float) -> bool:
        if self.best_loss is not None and loss >= self.best_loss:
            return False
        self.best_loss = loss
        if self.settings.early_stopping_patience:
            self.best_state = {k: p.detach().clone() for k, p in self._state().items()}
        return True

    def _restore_best(self) -> None:
        with torch.no_grad():
            for k, p in self._state().items():
                p.copy_(self.best_state[k])

    def _state(self) -> dict[str, nn.Parameter]:
        return {**{"a." + k: p for k, p in self.lora.a.items()}, **{"b." + k: p for k, p in self.lora.b.items()}}

    def _emit(self, event) -> None:
        if self.on_event is not None:
            self.on_event(event)

    def _free(self) -> None:
        """Drop optimizer state and device copies now, not when the caller drops the exception."""
        self.optimizer.state.clear()
        self.optimizer.param_groups.clear()
        self.lora.a.clear()
        self.lora.b.clear()
        self.best_state = None


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
