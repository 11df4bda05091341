"""The task heads' losses on real tensors: QA windows with and without their answer."""

from __future__ import annotations

import math

import torch
from loraserve.core.tasks.heads import QA
from loraserve.trainer.task_data import TaskTokenized
from loraserve.trainer.task_objective import collate_task, head_logits, task_loss


def qa_batch(targets: list[list[int]], length: int = 10, context_from: int = 4) -> dict:
    items = [TaskTokenized(list(range(1, length + 1)), "test", i, t, read=list(range(context_from, length)),
                           offsets=[None] * context_from + [(k, k + 1) for k in range(length - context_from)])
             for i, t in enumerate(targets)]
    return collate_task(items, 0, QA, False)


def logits_of(batch: dict, hidden_size: int = 6) -> torch.Tensor:
    torch.manual_seed(0)
    hidden = torch.randn(*batch["input_ids"].shape, hidden_size)
    return head_logits(hidden, batch, QA, torch.randn(2, hidden_size), torch.zeros(2))


def test_qa_batch_without_any_answer_has_zero_loss_not_nan():
    # Evaluation windows that lack the answer keep their -inf non-context logits: the loss stays 0.
    batch = qa_batch([[], []])
    logits = logits_of(batch)
    assert torch.isinf(logits).any()
    loss = task_loss(logits, batch, QA, False)
    assert loss.item() == 0.0 and math.isfinite(loss.item())


def test_qa_loss_is_the_mean_of_start_and_end_cross_entropy_over_answered_windows():
    batch = qa_batch([[5, 7], [], [4, 4]])
    logits = logits_of(batch)
    loss = task_loss(logits, batch, QA, False)
    want = 0.0
    for row, (s, e) in ((0, (5, 7)), (2, (4, 4))):
        ls, le = logits[row, :, 0].log_softmax(-1), logits[row, :, 1].log_softmax(-1)
        want += -(ls[s] + le[e]).item() / 2
    assert math.isfinite(loss.item()) and abs(loss.item() - want) < 1e-5
    assert torch.isinf(logits[:, :4]).all()  # the question's tokens can never be a span
