"""The losses and evaluations of the task kinds beside generation, over the backbone's hidden states.

The head is what Transformers puts on a decoder for the kind (core.tasks.heads): seq_cls reads the
last real token (right padding: position length - 1), token_cls each word's token, qa every context
token (start and end logits, the other positions masked out of the softmax). Losses are sums over
their units (examples; labelled tokens for tagging) so gradient accumulation can normalise by the
whole step, as the generation loss does.
"""

from __future__ import annotations

import torch
from loraserve.core.tasks.answer import best_span, char_span
from loraserve.core.tasks.heads import QA, SEQ_CLS, TOKEN_CLS
from loraserve.core.tasks.words import OUTSIDE
from loraserve.trainer.render import IGNORE
from loraserve.trainer.task_data import TaskExample, TaskTokenized
from loraserve.trainer.task_metrics import classification_metrics, entity_metrics, multilabel_metrics, squad_metrics
from torch import nn


def collate_task(batch: list[TaskTokenized], pad_token_id: int, kind: str, multi: bool) -> dict[str, torch.Tensor]:
    width = max(len(t.input_ids) for t in batch)
    n = len(batch)
    input_ids = torch.full((n, width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((n, width), dtype=torch.long)
    for row, t in enumerate(batch):
        input_ids[row, : len(t.input_ids)] = torch.tensor(t.input_ids, dtype=torch.long)
        attention_mask[row, : len(t.input_ids)] = 1
    out = {"input_ids": input_ids, "attention_mask": attention_mask,
           "last": torch.tensor([len(t.input_ids) - 1 for t in batch], dtype=torch.long)}
    if kind == SEQ_CLS:
        out["target"] = (torch.tensor([t.target for t in batch], dtype=torch.float32) if multi
                         else torch.tensor([t.target[0] for t in batch], dtype=torch.long))
    elif kind == TOKEN_CLS:
        target = torch.full((n, width), IGNORE, dtype=torch.long)
        for row, t in enumerate(batch):
            target[row, : len(t.target)] = torch.tensor(t.target, dtype=torch.long)
        out["target"] = target
    else:
        context = torch.zeros((n, width), dtype=torch.bool)
        for row, t in enumerate(batch):
            context[row, t.read] = True
        out["context"] = context
        out["target"] = torch.tensor([t.target or [-1, -1] for t in batch], dtype=torch.long)  # [n, 2]
    return out


def loss_units(batch: dict[str, torch.Tensor], kind: str) -> int:
    if kind == TOKEN_CLS:
        return int((batch["target"] != IGNORE).sum())
    if kind == QA:
        return int((batch["target"][:, 0] >= 0).sum())
    return int(batch["input_ids"].shape[0])


def head_logits(hidden: torch.Tensor, batch: dict[str, torch.Tensor], kind: str, weight, bias) -> torch.Tensor:
    """hidden [n, L, H] -> seq_cls [n, labels] at the last token; token_cls [n, L, labels]; qa [n, L, 2]
    with non-context positions at -inf."""
    if kind == SEQ_CLS:
        last = batch["last"].to(hidden.device)
        hidden = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    logits = nn.functional.linear(hidden.float(), weight, bias)
    if kind == QA:
        logits = logits.masked_fill(~batch["context"].to(logits.device)[..., None], float("-inf"))
    return logits


def task_loss(logits: torch.Tensor, batch: dict[str, torch.Tensor], kind: str, multi: bool) -> torch.Tensor:
    """Summed loss over the batch's units."""
    target = batch["target"].to(logits.device)
    if kind == SEQ_CLS:
        if multi:  # the mean over labels per example (BCEWithLogitsLoss's), summed over examples
            return nn.functional.binary_cross_entropy_with_logits(logits, target, reduction="none").mean(-1).sum()
        return nn.functional.cross_entropy(logits, target, reduction="sum")
    if kind == TOKEN_CLS:
        return nn.functional.cross_entropy(logits.flatten(0, 1), target.flatten(), ignore_index=IGNORE,
                                           reduction="sum")
    keep = target[:, 0] >= 0
    if not keep.any():
        # Windows without their answer (evaluation only) carry no loss. Their non-context logits are
        # -inf, and -inf * 0 is NaN: zero them first.
        return logits.masked_fill(~torch.isfinite(logits), 0.0).sum() * 0.0
    start, end = logits[keep, :, 0], logits[keep, :, 1]
    return (nn.functional.cross_entropy(start, target[keep, 0], reduction="sum")
            + nn.functional.cross_entropy(end, target[keep, 1], reduction="sum")) / 2


class Predictions:
    """Collects the evaluation's outputs batch by batch, then scores them against the examples."""

    def __init__(self, kind: str, labels: tuple[str, ...], multi: bool, threshold: float, max_answer_tokens: int):
        self.kind, self.labels, self.multi = kind, labels, multi
        self.threshold, self.max_answer_tokens = threshold, max_answer_tokens
        self.out: dict[int, object] = {}

    def add(self, items: list[TaskTokenized], logits: torch.Tensor) -> None:
        logits = logits.detach().float().cpu()
        for i, t in enumerate(items):
            if self.kind == SEQ_CLS:
                row = logits[i]
                self.out[t.example] = ([int(x) for x in (row.sigmoid() >= self.threshold)] if self.multi
                                       else int(row.argmax()))
            elif self.kind == TOKEN_CLS:
                self.out[t.example] = [self.labels[int(x)] for x in logits[i, t.read].argmax(-1)]
            else:
                n = len(t.input_ids)
                mask = torch.zeros(n, dtype=torch.bool)
                mask[t.read] = True
                span = best_span(logits[i, :n, 0], logits[i, :n, 1], mask, self.max_answer_tokens)
                if span is None:
                    continue
                start, end, score = span
                best = self.out.get(t.example)
                if best is None or score > best[0]:  # the best window of the context wins
                    self.out[t.example] = (score, start, end, t.offsets)

    def report(self, examples: list[TaskExample]) -> dict:
        """The full metrics report (per class, confusion matrix, ...) for the held-out examples."""
        if self.kind == SEQ_CLS:
            if self.multi:
                true = [[1 if x in e.labels else 0 for x in self.labels] for e in examples]
                pred = [self.out.get(i, [0] * len(self.labels)) for i in range(len(examples))]
                return multilabel_metrics(true, pred, list(self.labels))
            true = [self.labels.index(e.labels[0]) for e in examples]
            pred = [self.out.get(i, 0) for i in range(len(examples))]
            return classification_metrics(true, pred, list(self.labels))
        if self.kind == TOKEN_CLS:
            # Words cut by max_length were never read: scored as predicted O, as a reader would see them.
            pred = [(self.out.get(i, []) + [OUTSIDE] * len(e.tags))[: len(e.tags)] for i, e in enumerate(examples)]
            report = entity_metrics([list(e.tags) for e in examples], pred)
            for name in ("precision", "recall", "f1"):
                report[f"entity_{name}"] = report.pop(name)
            return report
        texts = []
        for i, e in enumerate(examples):
            found = self.out.get(i)
            if found:
                first, last = char_span(e.context, found[3], found[1], found[2])
                texts.append(e.context[first:last])
            else:
                texts.append("")
        return squad_metrics(texts, [[t for t, _ in e.answers] for e in examples])


def scalar_metrics(report: dict) -> dict[str, float]:
    """The report's single numbers (what events carry and early stopping can follow)."""
    return {k: float(v) for k, v in report.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
            and k not in ("count", "support", "predicted", "correct")}
