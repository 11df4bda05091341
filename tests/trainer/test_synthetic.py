"""The generated data sets: valid formats, deterministic, held-out split disjoint from train."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections import Counter

import pytest
from loraserve.trainer import synthetic as S

N = 400


def entity_strings(records: list[dict]) -> list[tuple[str, str]]:
    """(label, surface text) of every entity in "tokens" records."""
    out = []
    for rec in records:
        for tok, tag in zip(rec["tokens"], rec["tags"]):
            if tag.startswith("B-"):
                out.append((tag[2:], tok))
            elif tag.startswith("I-"):
                out[-1] = (out[-1][0], out[-1][1] + " " + tok)
    return out


def assert_iob2(tags: list[str]) -> None:
    prev = "O"
    for tag in tags:
        assert tag == "O" or re.fullmatch(r"[BI]-(PER|LOC|ORG|MISC)", tag), tag
        if tag.startswith("I-"):
            assert prev != "O" and prev[2:] == tag[2:], (prev, tag, tags)
        prev = tag


@pytest.mark.parametrize("split", S.SPLITS)
def test_entities_tokens_valid_iob2(split):
    records = S.entities(N, 1, split)
    counts = Counter()
    for rec in records:
        assert set(rec) == {"tokens", "tags"}
        assert len(rec["tokens"]) == len(rec["tags"]) > 0
        assert all(t and " " not in t for t in rec["tokens"])
        assert_iob2(rec["tags"])
        counts[sum(t.startswith("B-") for t in rec["tags"])] += 1
        assert rec["tokens"][-1] in {".", "?"} or rec["tags"][-1] != "O"
    assert set(counts) <= set(range(5)) and {0, 4} <= set(counts), counts
    labels = Counter(label for label, _ in entity_strings(records))
    assert set(labels) == set(S.ENTITY_TYPES)
    assert any(len(text.split()) > 1 for _, text in entity_strings(records))  # multi-word names
    # CoNLL tokenisation: punctuation and the possessive are tokens of their own
    tokens = {t for rec in records for t in rec["tokens"]}
    assert {",", "."} <= tokens and "'s" in tokens


@pytest.mark.parametrize("split", S.SPLITS)
def test_entities_text_spans_match_tokens(split):
    as_text = S.entities(N, 2, split, format="text")
    as_tokens = S.entities(N, 2, split, format="tokens")
    for rec, toks in zip(as_text, as_tokens, strict=True):
        assert set(rec) == {"text", "entities"}
        text, ends = rec["text"], 0
        for ent in rec["entities"]:
            assert set(ent) == {"start", "end", "label"} and ent["label"] in S.ENTITY_TYPES
            assert ends <= ent["start"] < ent["end"] <= len(text)  # sorted, not overlapping
            piece = text[ent["start"]:ent["end"]]
            assert piece == piece.strip() and piece[0].isupper()
            ends = ent["end"]
        # the same sentence in both formats, with the same entities
        spans = [(e["label"], text[e["start"]:e["end"]]) for e in rec["entities"]]
        assert spans == entity_strings([toks])
        assert text.replace(" ", "") == "".join(toks["tokens"])
    assert any(e["start"] == 0 for rec in as_text for e in rec["entities"])  # sentence-initial entity


def test_entities_common_words_as_names_and_plain_words():
    records = S.entities(2000, 3, "train")
    as_name = {t for rec in records for t, g in zip(rec["tokens"], rec["tags"]) if g.endswith("PER")}
    as_word = {t.lower() for rec in records for t, g in zip(rec["tokens"], rec["tags"]) if g == "O"}
    assert {"rose", "will", "hope"} <= {w.lower() for w in as_name} & as_word


@pytest.mark.parametrize("split", S.SPLITS)
def test_squad_answers_at_answer_start(split):
    records = S.squad(N, 4, split)
    kinds = Counter()
    for rec in records:
        assert set(rec) == {"context", "question", "answers"}
        ctx, ans = rec["context"], rec["answers"]
        assert len(ans["text"]) == len(ans["answer_start"]) == 1
        start, text = ans["answer_start"][0], ans["text"][0]
        assert text and ctx[start:start + len(text)] == text
        assert 2 <= len(re.findall(r"\.(?: |$)", ctx)) <= 5
        assert rec["question"].endswith("?") and text not in rec["question"]
        kinds[rec["question"].split()[0] if not rec["question"].startswith("How many") else "How many"] += 1
    assert {"Who", "Where", "When", "How many", "What", "Which", "In"} <= set(kinds), kinds


def test_squad_contexts_carry_distractors_of_the_answer_type():
    """A "who" question's context names at least two people, a "when"/year one at least two years."""
    for rec in S.squad(N, 5, "train"):
        answer = rec["answers"]["text"][0]
        if re.fullmatch(r"\d{4}", answer):
            assert len(set(re.findall(r"\b(?:19|20)\d\d\b", rec["context"]))) >= 2
        if rec["question"].startswith("Who "):
            names = {f"{f} {l}" for f in S.pool("first", "train") for l in S.pool("last", "train")}
            assert sum(name in rec["context"] for name in names) >= 2


@pytest.mark.parametrize("split", S.SPLITS)
def test_sentiment_labels_balance_and_length(split):
    records = S.sentiment(N, 6, split)
    assert all(set(r) == {"text", "label"} for r in records)
    counts = Counter(r["label"] for r in records)
    assert set(counts) == {"positive", "negative"} and abs(counts["positive"] - counts["negative"]) <= 1
    assert all(6 <= len(r["text"].split()) <= 40 for r in records)
    assert len({r["text"] for r in records}) > 0.9 * N
    # not keyword-separable: contrast and negation occur under both labels
    for cue in (", but ", " not ", "didn't"):
        assert {r["label"] for r in records if cue in r["text"]} == {"positive", "negative"}, cue
    assert any("not bad at all" in r["text"] and r["label"] == "positive" for r in S.sentiment(3000, 6, split))


def test_generation_mirrors_sentiment():
    gen, sent = S.generation(50, 7, "test"), S.sentiment(50, 7, "test")
    for g, s in zip(gen, sent, strict=True):
        assert g == {"prompt": f"Review: {s['text']}\nSentiment:", "completion": f" {s['label']}"}


@pytest.mark.parametrize("split", S.SPLITS)
def test_topics_labels(split):
    records = S.topics(N, 8, split)
    sizes, seen = Counter(), Counter()
    for rec in records:
        assert set(rec) == {"text", "labels"}
        labels = rec["labels"]
        assert 1 <= len(labels) <= 3 and len(set(labels)) == len(labels)
        assert labels == [t for t in S.TOPICS if t in labels]  # canonical order
        sizes[len(labels)] += 1
        seen.update(labels)
        assert rec["text"][0].isupper() and rec["text"].endswith(".")
    assert all(sizes[k] >= N // 4 for k in (1, 2, 3)), sizes
    assert set(seen) == set(S.TOPICS) and min(seen.values()) > N // 6, seen


@pytest.mark.parametrize("kind", list(S.KINDS))
def test_deterministic(kind):
    make = S.KINDS[kind]
    assert make(60, 11, "train") == make(60, 11, "train")
    assert make(60, 11, "train") != make(60, 12, "train")
    assert make(60, 11, "train") != make(60, 11, "test")


def test_deterministic_across_processes():
    code = "import json; from loraserve.trainer import synthetic as S; print(json.dumps(S.squad(20, 3, 'test')))"
    outs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={"PYTHONHASHSEED": str(h)}).stdout for h in (1, 2)}
    assert len(outs) == 1 and json.loads(outs.pop()) == S.squad(20, 3, "test")


def test_filler_pools_disjoint():
    for name in S._POOLS:
        train, test = set(S.pool(name, "train")), set(S.pool(name, "test"))
        assert train and test and not train & test, name
    # no word of a person's name crosses splits, whether first name or surname
    names = [set(S.pool("first", split)) | set(S.pool("last", split)) for split in S.SPLITS]
    assert not names[0] & names[1]


def test_splits_share_no_entities():
    train, test = (S.entities(1500, 9, split) for split in S.SPLITS)
    train_ents, test_ents = set(entity_strings(train)), set(entity_strings(test))
    assert not {t for _, t in train_ents} & {t for _, t in test_ents}
    per_tokens = [{w for label, t in ents if label == "PER" for w in t.split()} for ents in (train_ents, test_ents)]
    assert not per_tokens[0] & per_tokens[1]
    who = [{r["answers"]["text"][0] for r in S.squad(N, 9, split) if r["question"].startswith("Who ")}
           for split in S.SPLITS]
    assert who[0] and who[1] and not who[0] & who[1]


def skeletons(records: list[dict]) -> set[str]:
    """A sentence with its entities and numbers blanked: which template it came from."""
    out = set()
    for rec in records:
        words = [t if g == "O" else g[2:] for t, g in zip(rec["tokens"], rec["tags"]) if not g.startswith("I-")]
        out.add(re.sub(r"\d+", "#", " ".join(words)))
    return out


def test_test_split_has_templates_of_its_own():
    train, test = (skeletons(S.entities(2000, 10, split)) for split in S.SPLITS)
    assert test - train and train - test
    text = {split: " ".join(r["text"] for r in S.sentiment(2000, 10, split)) for split in S.SPLITS}
    assert "; however, " in text["test"] and "; however, " not in text["train"]
    assert ", yet " in text["train"] and ", yet " not in text["test"]
    # Most opinion words are the split's own: a held-out review is judged by words never trained on.
    for word, split in (("superb", "train"), ("worth every penny", "train"), ("marvellous", "test"),
                        ("money well spent", "test")):
        other = "test" if split == "train" else "train"
        assert word in text[split] and word not in text[other], word
    assert all(" great" in text[split] and " terrible" in text[split] for split in S.SPLITS)  # common ones shared


def test_bad_split_and_format_refused():
    with pytest.raises(ValueError, match="split"):
        S.sentiment(3, 0, "dev")
    with pytest.raises(ValueError, match="format"):
        S.entities(3, 0, "train", format="conll")


def test_cli_writes_jsonl(tmp_path):
    out = tmp_path / "ner.jsonl"
    S.main(["entities", "--n", "25", "--seed", "3", "--split", "test", "--out", str(out), "--format", "text"])
    lines = out.read_text(encoding="utf-8").splitlines()
    assert [json.loads(line) for line in lines] == S.entities(25, 3, "test", format="text")
    out2 = tmp_path / "sq.jsonl"
    subprocess.run([sys.executable, "-m", "loraserve.trainer.synthetic", "squad", "--n", "5", "--seed", "1",
                    "--out", str(out2)], check=True, capture_output=True)
    assert [json.loads(line) for line in out2.read_text().splitlines()] == S.squad(5, 1, "train")
