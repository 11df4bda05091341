"""Task metrics against hand-derived values (the derivations are in the comments)."""

from __future__ import annotations

import json

import pytest
from loraserve.core.errors import InvalidArgument
from loraserve.trainer.task_metrics import (
    classification_metrics,
    entity_metrics,
    multilabel_metrics,
    normalize_answer,
    squad_metrics,
)

approx = pytest.approx


def prf(p, r, f, support):
    return {"precision": approx(p), "recall": approx(r), "f1": approx(f), "support": support}


# --- classification ----------------------------------------------------------------------------

def test_classification_hand_checked():
    # confusion (rows true a, b, c; columns predicted): a: 1 1 0 / b: 0 2 0 / c: 1 0 1
    # a: tp 1, fp 1 (c predicted a), fn 1        -> P 1/2, R 1/2, F 1/2
    # b: tp 2, fp 1 (a predicted b), fn 0        -> P 2/3, R 1,   F 2*(2/3)/(5/3) = 4/5
    # c: tp 1, fp 0, fn 1                        -> P 1,   R 1/2, F 2/3
    # macro P (1/2 + 2/3 + 1)/3 = 13/18, R (1/2 + 1 + 1/2)/3 = 2/3, F (1/2 + 4/5 + 2/3)/3 = 59/90;
    # supports are equal, so weighted F = macro F
    m = classification_metrics([0, 0, 1, 1, 2, 2], [0, 1, 1, 1, 2, 0], ["a", "b", "c"])
    assert m["count"] == 6
    assert m["accuracy"] == approx(4 / 6)
    assert m["confusion_matrix"] == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    assert m["per_class"] == {"a": prf(0.5, 0.5, 0.5, 2), "b": prf(2 / 3, 1, 0.8, 2),
                              "c": prf(1, 0.5, 2 / 3, 2)}
    assert m["macro_precision"] == approx(13 / 18)
    assert m["macro_recall"] == approx(2 / 3)
    assert m["macro_f1"] == approx(59 / 90)
    assert m["weighted_f1"] == approx(59 / 90)
    assert json.loads(json.dumps(m)) == m


def test_classification_weighted_and_zero_division():
    # labels a, b, c; true a a a b, predicted a a b b; c never occurs
    # a: tp 2, fp 0, fn 1 -> P 1, R 2/3, F 0.8 (support 3)
    # b: tp 1, fp 1, fn 0 -> P 1/2, R 1, F 2/3 (support 1)
    # c: nothing -> 0, 0, 0 (zero_division=0), support 0, and left out of the macro averages
    m = classification_metrics([0, 0, 0, 1], [0, 0, 1, 1], ["a", "b", "c"])
    assert m["per_class"]["c"] == prf(0, 0, 0, 0)
    assert m["macro_precision"] == approx(0.75)  # (1 + 1/2) / 2
    assert m["macro_recall"] == approx(5 / 6)  # (2/3 + 1) / 2
    assert m["macro_f1"] == approx((0.8 + 2 / 3) / 2)
    assert m["weighted_f1"] == approx((0.8 * 3 + 2 / 3 * 1) / 4)
    # a class only predicted (b) has P 0 and R 0/0 -> 0
    m = classification_metrics([0, 0], [0, 1], ["a", "b", "c"])
    assert m["per_class"]["b"] == prf(0, 0, 0, 0)
    assert m["per_class"]["a"] == prf(1, 0.5, 2 / 3, 2)
    assert m["macro_f1"] == approx((2 / 3 + 0) / 2)  # over a and b, which occur


def test_classification_perfect_all_wrong_empty():
    m = classification_metrics([0, 1, 2, 1], [0, 1, 2, 1], ["a", "b", "c"])
    assert (m["accuracy"], m["macro_f1"], m["weighted_f1"]) == (1.0, 1.0, 1.0)
    m = classification_metrics([0, 1, 2], [1, 2, 0], ["a", "b", "c"])
    assert (m["accuracy"], m["macro_precision"], m["macro_recall"], m["macro_f1"]) == (0, 0, 0, 0)
    m = classification_metrics([], [], ["a", "b"])
    assert m["count"] == 0 and m["accuracy"] == 0.0 and m["macro_f1"] == 0.0
    assert m["confusion_matrix"] == [[0, 0], [0, 0]]


@pytest.mark.parametrize("y_true, y_pred, labels, message", [
    ([0, 1], [0], ["a", "b"], "2 true labels but 1 predictions"),
    ([0, 2], [0, 1], ["a", "b"], r"y_true\[1\] = 2 is not a label index in \[0, 2\)"),
    ([0], [-1], ["a", "b"], r"y_pred\[0\] = -1"),
    ([True], [0], ["a", "b"], r"y_true\[0\] = True"),
    ([0], [0], [], "labels must be a non-empty list"),
    ([0], [0], ["a", "a"], "distinct"),
])
def test_classification_rejects(y_true, y_pred, labels, message):
    with pytest.raises(InvalidArgument, match=message):
        classification_metrics(y_true, y_pred, labels)


# --- multi-label -------------------------------------------------------------------------------

def test_multilabel_hand_checked():
    # labels x, y, z over 3 examples
    # x: true 1 0 1, pred 1 0 1 -> tp 2                -> P 1, R 1, F 1 (support 2)
    # y: true 0 1 1, pred 0 1 1 -> tp 2                -> P 1, R 1, F 1 (support 2)
    # z: true 1 0 0, pred 0 1 0 -> tp 0, fp 1, fn 1    -> 0, 0, 0      (support 1)
    # micro: tp 4, fp 1, fn 1 -> P 0.8, R 0.8, F 0.8; macro: 2/3 each
    # subset accuracy: only example 2 exactly right -> 1/3; hamming: 2 of 9 cells wrong -> 7/9
    m = multilabel_metrics([[1, 0, 1], [0, 1, 0], [1, 1, 0]], [[1, 0, 0], [0, 1, 1], [1, 1, 0]],
                           ["x", "y", "z"])
    assert m["per_label"] == {"x": prf(1, 1, 1, 2), "y": prf(1, 1, 1, 2), "z": prf(0, 0, 0, 1)}
    assert (m["micro_precision"], m["micro_recall"], m["micro_f1"]) == (approx(0.8),) * 3
    assert (m["macro_precision"], m["macro_recall"], m["macro_f1"]) == (approx(2 / 3),) * 3
    assert m["subset_accuracy"] == approx(1 / 3)
    assert m["hamming_accuracy"] == approx(7 / 9)
    assert m["count"] == 3
    assert json.loads(json.dumps(m)) == m


def test_multilabel_uneven_micro_vs_macro():
    # x: true 1 1 1 1, pred 1 1 1 1 -> tp 4: 1, 1, 1
    # y: true 1 0 0 0, pred 1 1 1 0 -> tp 1, fp 2: P 1/3, R 1, F 1/2
    # micro: tp 5, fp 2, fn 0 -> P 5/7, R 1, F 2*(5/7)/(12/7) = 10/12 = 5/6
    # macro: P (1 + 1/3)/2 = 2/3, R 1, F (1 + 1/2)/2 = 3/4
    m = multilabel_metrics([[1, 1], [1, 0], [1, 0], [1, 0]], [[1, 1], [1, 1], [1, 1], [1, 0]],
                           ["x", "y"])
    assert m["micro_precision"] == approx(5 / 7) and m["micro_recall"] == 1.0
    assert m["micro_f1"] == approx(5 / 6)
    assert m["macro_precision"] == approx(2 / 3) and m["macro_f1"] == approx(0.75)
    assert m["subset_accuracy"] == approx(0.5) and m["hamming_accuracy"] == approx(6 / 8)


def test_multilabel_zero_division_and_extremes():
    # nothing true, nothing predicted: every P/R/F is 0/0 -> 0, yet every example is exactly right
    m = multilabel_metrics([[0, 0], [0, 0]], [[0, 0], [0, 0]], ["x", "y"])
    assert (m["micro_f1"], m["macro_f1"]) == (0.0, 0.0)
    assert (m["subset_accuracy"], m["hamming_accuracy"]) == (1.0, 1.0)
    m = multilabel_metrics([[1, 0], [0, 1]], [[0, 1], [1, 0]], ["x", "y"])
    assert (m["micro_f1"], m["macro_f1"], m["subset_accuracy"], m["hamming_accuracy"]) == (0, 0, 0, 0)
    m = multilabel_metrics([[1, 0], [0, 1]], [[1, 0], [0, 1]], ["x", "y"])
    assert (m["micro_f1"], m["macro_f1"], m["subset_accuracy"], m["hamming_accuracy"]) == (1, 1, 1, 1)
    m = multilabel_metrics([], [], ["x"])
    assert m["count"] == 0 and m["subset_accuracy"] == 0.0 and m["hamming_accuracy"] == 0.0


@pytest.mark.parametrize("y_true, y_pred, message", [
    ([[1, 0]], [], "1 true label sets but 0 predictions"),
    ([[1, 0]], [[1]], r"y_pred\[0\] must be a list of 2 0/1 values"),
    ([[1, 2]], [[1, 0]], r"y_true\[0\] has a value other than 0 or 1"),
    ([[1, 0.5]], [[1, 0]], r"y_true\[0\] has a value"),
    ([(1, 0)], [[1, 0]], r"y_true\[0\] must be a list"),
])
def test_multilabel_rejects(y_true, y_pred, message):
    with pytest.raises(InvalidArgument, match=message):
        multilabel_metrics(y_true, y_pred, ["x", "y"])


# --- entities ----------------------------------------------------------------------------------

def test_entity_metrics_seqeval_readme_example():
    # seqeval's README example (f1 0.50, accuracy 0.80):
    # true entities: MISC words 3..5 (sentence 0), PER 0..1 (sentence 1)
    # pred entities: MISC words 2..5 (wrong start),   PER 0..1 (right)
    # -> 1 correct of 2 predicted and 2 true: P = R = F = 1/2
    # tags: sentence 0 differs at words 2 (O/B) and 3 (B/I): 5/7 right, sentence 1 3/3: 8/10
    true = [["O", "O", "O", "B-MISC", "I-MISC", "I-MISC", "O"], ["B-PER", "I-PER", "O"]]
    pred = [["O", "O", "B-MISC", "I-MISC", "I-MISC", "I-MISC", "O"], ["B-PER", "I-PER", "O"]]
    m = entity_metrics(true, pred)
    assert (m["precision"], m["recall"], m["f1"]) == (0.5, 0.5, 0.5)
    assert (m["support"], m["predicted"], m["correct"]) == (2, 2, 1)
    assert m["per_type"] == {"MISC": prf(0, 0, 0, 1), "PER": prf(1, 1, 1, 1)}
    assert m["token_accuracy"] == approx(0.8)
    assert json.loads(json.dumps(m)) == m


def test_entity_metrics_i_after_o_starts_an_entity():
    # pred I-PER I-PER = PER 0..1 and O I-LOC = LOC 3..3: the same entities as the true tags,
    # so P = R = F = 1, though only words 1 and 2 carry the same tag (token accuracy 2/4)
    m = entity_metrics([["B-PER", "I-PER", "O", "B-LOC"]], [["I-PER", "I-PER", "O", "I-LOC"]])
    assert (m["precision"], m["recall"], m["f1"]) == (1.0, 1.0, 1.0)
    assert m["token_accuracy"] == 0.5


def test_entity_metrics_type_change_inside_i_tags():
    # true: ORG 0..2; pred B-ORG I-LOC I-LOC = ORG 0..0 and LOC 1..2 (the type change starts one)
    # correct 0, predicted 2, true 1 -> P 0, R 0, F 0; LOC appears with support 0
    m = entity_metrics([["B-ORG", "I-ORG", "I-ORG"]], [["B-ORG", "I-LOC", "I-LOC"]])
    assert (m["precision"], m["recall"], m["f1"]) == (0.0, 0.0, 0.0)
    assert (m["support"], m["predicted"], m["correct"]) == (1, 2, 0)
    assert m["per_type"] == {"LOC": prf(0, 0, 0, 0), "ORG": prf(0, 0, 0, 1)}
    assert m["token_accuracy"] == approx(1 / 3)


def test_entity_metrics_partial_credit_and_per_type():
    # true: PER 0..1, LOC 3..3, LOC 5..5, ORG 7..7   (4)
    # pred: PER 0..1 (ok), LOC 3..3 (ok), PER 5..5 (wrong type), ORG 7..8 (wrong end)   (4)
    # correct 2: P 2/4, R 2/4, F 1/2
    # PER: tp 1, fp 1 (5..5), fn 0 -> P 1/2, R 1, F 2/3 (support 1)
    # LOC: tp 1, fp 0, fn 1 (5..5) -> P 1, R 1/2, F 2/3 (support 2)
    # ORG: tp 0, fp 1, fn 1        -> 0, 0, 0 (support 1)
    # tags: 9 words, differ at 5 (B-LOC/B-PER) and 8 (O/I-ORG) -> 7/9
    true = [["B-PER", "I-PER", "O", "B-LOC", "O", "B-LOC", "O", "B-ORG", "O"]]
    pred = [["B-PER", "I-PER", "O", "B-LOC", "O", "B-PER", "O", "B-ORG", "I-ORG"]]
    m = entity_metrics(true, pred)
    assert (m["precision"], m["recall"], m["f1"]) == (0.5, 0.5, 0.5)
    assert m["per_type"] == {"LOC": prf(1, 0.5, 2 / 3, 2), "ORG": prf(0, 0, 0, 1),
                             "PER": prf(0.5, 1, 2 / 3, 1)}
    assert m["token_accuracy"] == approx(7 / 9)


def test_entity_metrics_sentences_do_not_join():
    # a sentence ending in B-PER and the next starting with I-PER are two entities, as seqeval's
    # flattening with an O between sentences makes them; the pred B-PER there is the same entity
    m = entity_metrics([["O", "B-PER"], ["I-PER", "O"]], [["O", "B-PER"], ["B-PER", "O"]])
    assert (m["support"], m["correct"], m["f1"]) == (2, 2, 1.0)
    assert m["token_accuracy"] == 0.75
    # the same entity span in another sentence is another entity
    m = entity_metrics([["B-PER"], ["O"]], [["O"], ["B-PER"]])
    assert (m["support"], m["predicted"], m["correct"], m["f1"]) == (1, 1, 0, 0.0)


def test_entity_metrics_zero_division_and_empty():
    m = entity_metrics([["O", "O"]], [["O", "O"]])
    assert (m["precision"], m["recall"], m["f1"], m["per_type"]) == (0.0, 0.0, 0.0, {})
    assert m["token_accuracy"] == 1.0
    m = entity_metrics([["B-PER"]], [["O"]])  # nothing predicted: P 0/0 -> 0, R 0
    assert (m["precision"], m["recall"], m["f1"]) == (0.0, 0.0, 0.0)
    m = entity_metrics([], [])
    assert (m["f1"], m["token_accuracy"], m["support"]) == (0.0, 0.0, 0)
    m = entity_metrics([[]], [[]])
    assert (m["f1"], m["token_accuracy"]) == (0.0, 0.0)


@pytest.mark.parametrize("true, pred, message", [
    ([["O"]], [], "1 true sentences but 0 predicted"),
    ([["O", "O"]], [["O"]], "sentence 0: 2 true tags but 1 predicted"),
    ([["O"], ["PER"]], [["O"], ["O"]], r"sentence 1, true: tag 0 \('PER'\) is not O"),
    ([["O"]], [["E-PER"]], r"sentence 0, predicted: tag 0 \('E-PER'\)"),
])
def test_entity_metrics_rejects(true, pred, message):
    with pytest.raises(InvalidArgument, match=message):
        entity_metrics(true, pred)


# --- SQuAD -------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, normalized", [
    ("The  Eiffel-Tower!", "eiffeltower"),  # punctuation goes first, so the hyphen joins
    ("An apple a day", "apple day"),
    ("theater anthem", "theater anthem"),  # articles only as whole words
    ("  1,000  ", "1000"),
    ("Café «Zoë»", "café «zoë»"),  # only ASCII punctuation is removed
    ("", ""),
])
def test_normalize_answer(text, normalized):
    assert normalize_answer(text) == normalized


def test_squad_hand_checked():
    # q0: "the Eiffel Tower" vs "Eiffel Tower": both normalize to "eiffel tower": EM 1, F1 1
    # q1: pred "Eiffel Tower in Paris" -> eiffel tower in paris (4 tokens)
    #     vs "the Eiffel Tower" -> eiffel tower: 2 shared, P 2/4, R 1, F1 2/3
    #     vs "Paris" -> paris: 1 shared, P 1/4, R 1, F1 2*(1/4)/(5/4) = 2/5; best 2/3, EM 0
    # q2: "cat cat dog" vs "cat dog dog": shared cat 1 + dog 1 = 2, P 2/3, R 2/3, F1 2/3
    # EM (1 + 0 + 0)/3, F1 (1 + 2/3 + 2/3)/3 = 7/9
    m = squad_metrics(["the Eiffel Tower", "Eiffel Tower in Paris", "cat cat dog"],
                      [["Eiffel Tower"], ["the Eiffel Tower", "Paris"], ["cat dog dog"]])
    assert m == {"count": 3, "exact_match": approx(1 / 3), "f1": approx(7 / 9)}
    assert json.loads(json.dumps(m)) == m


def test_squad_edge_cases():
    # v1.1: two empty answers are an exact match but share no token: F1 0
    assert squad_metrics([""], [[""]]) == {"count": 1, "exact_match": 1.0, "f1": 0.0}
    # an answer of only articles/punctuation normalizes to empty too
    assert squad_metrics(["The."], [["a"]]) == {"count": 1, "exact_match": 1.0, "f1": 0.0}
    assert squad_metrics(["Paris"], [["London", "Berlin"]]) == {"count": 1, "exact_match": 0.0,
                                                                "f1": 0.0}
    assert squad_metrics(["x", "y"], [["x"], ["y", "z"]]) == {"count": 2, "exact_match": 1.0,
                                                              "f1": 1.0}
    assert squad_metrics([], []) == {"count": 0, "exact_match": 0.0, "f1": 0.0}


@pytest.mark.parametrize("predictions, references, message", [
    (["a"], [], "1 predictions but 0 reference lists"),
    (["a"], [[]], "references 0 must be a non-empty list of strings"),
    (["a"], ["a"], "references 0 must be"),
    (["a", None], [["a"], ["b"]], "prediction 1 must be a string"),
])
def test_squad_rejects(predictions, references, message):
    with pytest.raises(InvalidArgument, match=message):
        squad_metrics(predictions, references)
