"""Evaluation metrics for the task heads, in pure Python: plain dicts that go into JSON as they are.

Definitions follow the references people compare against, so numbers here match theirs:
sklearn's precision_recall_fscore_support (zero_division=0) for classification, seqeval's default
mode for entities, and the official SQuAD v1.1 script for extractive QA. Empty inputs give zeros
(with their counts) rather than errors: an evaluation split can legitimately have no examples of a
class, or none at all.
"""

from __future__ import annotations

import re
import string
from collections import Counter

from loraserve.core.errors import InvalidArgument
from loraserve.core.tasks.words import bio_entities, check_bio


def _div(num: float, den: float) -> float:
    """num / den, 0.0 when den is 0 (sklearn's zero_division=0)."""
    return num / den if den else 0.0


def _prf(tp: int, fp: int, fn: int) -> dict:
    """Precision, recall and F1 from counts; support = tp + fn (the true instances)."""
    p, r = _div(tp, tp + fp), _div(tp, tp + fn)
    return {"precision": p, "recall": r, "f1": _div(2 * p * r, p + r), "support": tp + fn}


def _check_classes(name: str, values: list[int], n: int) -> None:
    for i, v in enumerate(values):
        if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < n:
            raise InvalidArgument(f"{name}[{i}] = {v!r} is not a label index in [0, {n})")


def classification_metrics(y_true: list[int], y_pred: list[int], labels: list[str]) -> dict:
    """Single-label classification: accuracy, per-class precision/recall/f1/support keyed by label
    name (every label listed), macro precision/recall/f1, weighted f1 and the confusion matrix
    (rows true, columns predicted, in labels' order).

    Macro averages run over the labels that occur in y_true or y_pred, as sklearn's
    f1_score(average="macro") without labels=: a class absent from the evaluation split and never
    predicted says nothing about the model. Macro f1 is the mean of per-class f1 (not the f1 of the
    macro precision and recall); weighted f1 weights per-class f1 by support."""
    if len(y_true) != len(y_pred):
        raise InvalidArgument(f"{len(y_true)} true labels but {len(y_pred)} predictions")
    if not labels or len(set(labels)) != len(labels):
        raise InvalidArgument("labels must be a non-empty list of distinct names")
    n = len(labels)
    _check_classes("y_true", y_true, n)
    _check_classes("y_pred", y_pred, n)
    confusion = [[0] * n for _ in range(n)]
    for t, p in zip(y_true, y_pred):
        confusion[t][p] += 1
    per_class = {}
    for c, name in enumerate(labels):
        tp = confusion[c][c]
        fp = sum(confusion[r][c] for r in range(n)) - tp
        fn = sum(confusion[c]) - tp
        per_class[name] = _prf(tp, fp, fn)
    seen = set(y_true) | set(y_pred)
    present = [labels[c] for c in range(n) if c in seen]
    total = len(y_true)
    return {
        "count": total,
        "accuracy": _div(sum(confusion[c][c] for c in range(n)), total),
        "per_class": per_class,
        "macro_precision": _div(sum(per_class[k]["precision"] for k in present), len(present)),
        "macro_recall": _div(sum(per_class[k]["recall"] for k in present), len(present)),
        "macro_f1": _div(sum(per_class[k]["f1"] for k in present), len(present)),
        "weighted_f1": _div(sum(v["f1"] * v["support"] for v in per_class.values()), total),
        "confusion_matrix": confusion,
    }


def _check_indicators(name: str, rows: list[list[int]], n: int) -> None:
    for i, row in enumerate(rows):
        if not isinstance(row, list) or len(row) != n:
            raise InvalidArgument(f"{name}[{i}] must be a list of {n} 0/1 values")
        if any(v not in (0, 1) or not isinstance(v, int) for v in row):
            raise InvalidArgument(f"{name}[{i}] has a value other than 0 or 1")


def multilabel_metrics(y_true: list[list[int]], y_pred: list[list[int]], labels: list[str]) -> dict:
    """Multi-label classification (a 0/1 indicator per label per example): micro precision/recall/
    f1 (counts pooled over all labels), macro (mean of per-label values over every label, as sklearn
    does for indicator matrices), per-label precision/recall/f1/support, subset accuracy (the whole
    label set exactly right) and hamming accuracy (the fraction of individual indicators right)."""
    if len(y_true) != len(y_pred):
        raise InvalidArgument(f"{len(y_true)} true label sets but {len(y_pred)} predictions")
    if not labels or len(set(labels)) != len(labels):
        raise InvalidArgument("labels must be a non-empty list of distinct names")
    n = len(labels)
    _check_indicators("y_true", y_true, n)
    _check_indicators("y_pred", y_pred, n)
    per_label, totals = {}, [0, 0, 0]
    for c, name in enumerate(labels):
        tp = sum(1 for t, p in zip(y_true, y_pred) if t[c] and p[c])
        fp = sum(1 for t, p in zip(y_true, y_pred) if not t[c] and p[c])
        fn = sum(1 for t, p in zip(y_true, y_pred) if t[c] and not p[c])
        per_label[name] = _prf(tp, fp, fn)
        totals = [totals[0] + tp, totals[1] + fp, totals[2] + fn]
    micro = _prf(*totals)
    cells = len(y_true) * n
    return {
        "count": len(y_true),
        "micro_precision": micro["precision"],
        "micro_recall": micro["recall"],
        "micro_f1": micro["f1"],
        "macro_precision": _div(sum(v["precision"] for v in per_label.values()), n),
        "macro_recall": _div(sum(v["recall"] for v in per_label.values()), n),
        "macro_f1": _div(sum(v["f1"] for v in per_label.values()), n),
        "per_label": per_label,
        "subset_accuracy": _div(sum(1 for t, p in zip(y_true, y_pred) if t == p), len(y_true)),
        "hamming_accuracy": _div(sum(a == b for t, p in zip(y_true, y_pred) for a, b in zip(t, p)),
                                 cells),
    }


def entity_metrics(true_tags: list[list[str]], pred_tags: list[list[str]]) -> dict:
    """Entity-level precision/recall/f1 as seqeval's default mode (what CoNLL results are quoted
    in): an entity is (sentence, type, first word, last word) from bio_entities (seqeval's
    get_entities: I- after O or after another type starts an entity), and a prediction counts only
    if type and both ends match exactly. Overall values are micro-averaged; per-type values cover
    every type in either side (support 0 for a type only predicted). token_accuracy is the
    fraction of tags equal, O included."""
    if len(true_tags) != len(pred_tags):
        raise InvalidArgument(f"{len(true_tags)} true sentences but {len(pred_tags)} predicted")
    true_set: set[tuple[int, str, int, int]] = set()
    pred_set: set[tuple[int, str, int, int]] = set()
    same = tokens = 0
    for s, (true, pred) in enumerate(zip(true_tags, pred_tags)):
        if len(true) != len(pred):
            raise InvalidArgument(f"sentence {s}: {len(true)} true tags but {len(pred)} predicted")
        for side, tags, found in (("true", true, true_set), ("predicted", pred, pred_set)):
            try:
                check_bio(tags)
            except InvalidArgument as e:
                raise InvalidArgument(f"sentence {s}, {side}: {e}") from None
            found.update((s, kind, first, last) for kind, first, last in bio_entities(tags))
        same += sum(t == p for t, p in zip(true, pred))
        tokens += len(true)
    per_type = {}
    for kind in sorted({e[1] for e in true_set | pred_set}):
        t = {e for e in true_set if e[1] == kind}
        p = {e for e in pred_set if e[1] == kind}
        per_type[kind] = _prf(len(t & p), len(p - t), len(t - p))
    overall = _prf(len(true_set & pred_set), len(pred_set - true_set), len(true_set - pred_set))
    return {
        "precision": overall["precision"],
        "recall": overall["recall"],
        "f1": overall["f1"],
        "support": overall["support"],
        "predicted": len(pred_set),
        "correct": len(true_set & pred_set),
        "per_type": per_type,
        "token_accuracy": _div(same, tokens),
    }


_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD v1.1's normalize_answer: lower-case, drop ASCII punctuation, drop the articles a, an,
    the, collapse whitespace (in that order, as the official script)."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def _token_f1(prediction: str, reference: str) -> float:
    """SQuAD v1.1 token F1 of normalized answers: 0.0 when nothing is shared, including when both
    are empty (the v1.1 script's behaviour; v2.0 would give 1.0 there)."""
    pred, ref = normalize_answer(prediction).split(), normalize_answer(reference).split()
    same = sum((Counter(pred) & Counter(ref)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(ref)
    return 2 * precision * recall / (precision + recall)


def squad_metrics(predictions: list[str], references: list[list[str]]) -> dict:
    """SQuAD v1.1 exact match and token F1, each the best over a question's reference answers and
    averaged over questions, as FRACTIONS in [0, 1] (the official script reports percentages:
    multiply by 100 to compare)."""
    if len(predictions) != len(references):
        raise InvalidArgument(f"{len(predictions)} predictions but {len(references)} reference lists")
    em = f1 = 0.0
    for i, (pred, refs) in enumerate(zip(predictions, references)):
        if not isinstance(pred, str):
            raise InvalidArgument(f"prediction {i} must be a string, got {type(pred).__name__}")
        if not isinstance(refs, list) or not refs or not all(isinstance(r, str) for r in refs):
            raise InvalidArgument(f"references {i} must be a non-empty list of strings")
        em += max(float(normalize_answer(pred) == normalize_answer(r)) for r in refs)
        f1 += max(_token_f1(pred, r) for r in refs)
    n = len(predictions)
    return {"count": n, "exact_match": _div(em, n), "f1": _div(f1, n)}
