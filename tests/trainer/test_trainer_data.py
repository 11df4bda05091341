"""Data: validation with line numbers, loss masking, truncation, split, hash and collation."""

from __future__ import annotations

import copy
import json

import pytest
from loraserve.core.errors import InvalidArgument, NotFound
from loraserve.trainer.data import (
    collate,
    data_hash,
    parse_records,
    prepare,
    read_jsonl,
    split_indices,
)
from loraserve.trainer.render import IGNORE
from loraserve.trainer.settings import TrainSettings

EOS = 2  # <|im_end|> in SmolLM2's tokenizer, the tiny model's EOS


def write_lines(tmp_path, lines) -> str:
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


GOOD = json.dumps({"prompt": "p", "completion": "c"})


@pytest.mark.parametrize("bad_line, message", [
    ('{"prompt": "p", "completion": ', "line 3: not valid JSON"),
    (json.dumps({"prompt": "p"}), "line 3: missing field 'completion'"),
    (json.dumps({"completion": "c"}), "line 3: missing field 'prompt'"),
    (json.dumps({"prompt": 7, "completion": "c"}), "line 3: field 'prompt' must be a string, got a number"),
    (json.dumps({"prompt": "p", "completion": None}), "line 3: field 'completion' must be a string, got null"),
    (json.dumps({"prompt": "p", "completion": "  "}), "line 3: completion is empty"),
    (json.dumps(["p", "c"]), "line 3: expected a JSON object, got an array"),
    (json.dumps({"messages": "hi"}), "line 3: messages must be a non-empty array"),
    (json.dumps({"messages": []}), "line 3: messages must be a non-empty array"),
    (json.dumps({"messages": [{"content": "x"}]}), r"line 3: messages\[0\]: missing field 'role'"),
    (json.dumps({"messages": [{"role": "user", "content": ["x"]}]}), r"line 3: messages\[0\]: field 'content'"),
    (json.dumps({"messages": [{"role": "user", "content": "x"}]}), "line 3: no non-empty assistant message"),
    (json.dumps({"messages": [{"role": "robot", "content": "x"}]}), r"line 3: messages\[0\]: role 'robot' is not one"),
    (json.dumps({"messages": [{"role": "user", "content": "x"}], "prompt": "p"}), "line 3: give either"),
])
def test_bad_lines_name_their_line(tmp_path, bad_line, message):
    path = write_lines(tmp_path, [GOOD, "", bad_line, GOOD])  # the blank line still counts
    with pytest.raises(InvalidArgument, match=message):
        read_jsonl(path)


def test_invalid_utf8_names_the_line(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_bytes(GOOD.encode() + b"\n" + b'{"prompt": "\xff", "completion": "c"}\n')
    with pytest.raises(InvalidArgument, match="line 2: not valid UTF-8"):
        read_jsonl(path)


def test_empty_and_missing_files(tmp_path):
    with pytest.raises(InvalidArgument, match="holds no examples"):
        read_jsonl(write_lines(tmp_path, ["", "   "]))
    with pytest.raises(NotFound):
        read_jsonl(tmp_path / "nope.jsonl")


def test_file_parses_both_forms_and_skips_blank_lines(tmp_path):
    chat = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}], "id": 3}
    path = tmp_path / "data.jsonl"
    path.write_text("\ufeff" + GOOD + "\n\n" + json.dumps(chat) + "\n")  # a byte-order mark is tolerated
    examples = read_jsonl(path)
    assert [e.source for e in examples] == ["line 1", "line 3"]
    assert examples[1].messages == (("user", "hi"), ("assistant", "yo"))
    with pytest.raises(InvalidArgument, match="more than 1 examples"):
        read_jsonl(path, max_examples=1)


def test_inline_examples_say_example_n():
    records = [{"prompt": "p", "completion": "c"}, {"prompt": "p", "completion": 3}]
    with pytest.raises(InvalidArgument, match="example 2: field 'completion' must be a string"):
        parse_records(records)
    with pytest.raises(InvalidArgument, match="empty"):
        parse_records([])
    with pytest.raises(InvalidArgument, match="list"):
        parse_records({"prompt": "p"})
    assert [e.source for e in parse_records(records[:1])] == ["example 1"]


def learned_text(tokenizer, t) -> str:
    return tokenizer.decode([i for i, label in zip(t.input_ids, t.labels, strict=True) if label != IGNORE])


def test_chat_prompt_completion_learns_only_the_assistant_turn_and_eos(tokenizer):
    data = prepare(parse_records([{"prompt": "Say it", "completion": "XYZZY"}]), tokenizer,
                   TrainSettings(eval_fraction=0), [EOS])
    t = data.train[0]
    assert learned_text(tokenizer, t) == "XYZZY<|im_end|>"
    learned = [i for i, label in zip(t.input_ids, t.labels, strict=True) if label != IGNORE]
    assert learned[-1] == EOS and all(label in (IGNORE, i) for i, label in zip(t.input_ids, t.labels, strict=True))
    # The prompt is what serving renders for a user message, generation prompt included.
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Say it"}], tokenize=False,
                                           add_generation_prompt=True)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    assert t.input_ids[:len(prompt_ids)] == prompt_ids
    assert all(label == IGNORE for label in t.labels[:len(prompt_ids)])
    assert t.labels[len(prompt_ids)] != IGNORE


def test_plain_template_concatenates_and_appends_eos(tokenizer):
    data = prepare(parse_records([{"prompt": "Q: 2+2? A:", "completion": " 4"}]), tokenizer,
                   TrainSettings(eval_fraction=0, template="plain"), [EOS])
    t = data.train[0]
    prompt_ids = tokenizer("Q: 2+2? A:")["input_ids"]
    assert t.input_ids == prompt_ids + tokenizer(" 4", add_special_tokens=False)["input_ids"] + [EOS]
    assert t.labels[:len(prompt_ids)] == [IGNORE] * len(prompt_ids)
    assert learned_text(tokenizer, t) == " 4<|im_end|>"


def test_multi_turn_chat_learns_every_assistant_turn(tokenizer):
    messages = [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "a"},
                {"role": "assistant", "content": "first"}, {"role": "user", "content": "b"},
                {"role": "assistant", "content": "second"}]
    data = prepare(parse_records([{"messages": messages}]), tokenizer, TrainSettings(eval_fraction=0), [EOS])
    t = data.train[0]
    assert learned_text(tokenizer, t) == "first<|im_end|>second<|im_end|>"
    assert t.input_ids == tokenizer.apply_chat_template(messages, tokenize=True)["input_ids"]
    assert data.stats.completion_tokens == t.label_tokens


def test_chat_needs_a_template(tokenizer):
    bare = copy.deepcopy(tokenizer)
    bare.chat_template = None
    examples = parse_records([{"prompt": "p", "completion": "c"}])
    with pytest.raises(InvalidArgument, match="template=chat"):
        prepare(examples, bare, TrainSettings(template="chat"), [EOS])
    # auto falls back to plain
    assert prepare(examples, bare, TrainSettings(), [EOS]).train[0].input_ids[-1] == EOS
    chat = parse_records([{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}])
    with pytest.raises(InvalidArgument, match="example 1: messages need a chat template"):
        prepare(chat, bare, TrainSettings(), [EOS])


def test_long_examples_are_cut_at_the_end_and_counted(tokenizer):
    records = [{"prompt": "short", "completion": "word " * 200}, {"prompt": "short", "completion": "ok"}]
    data = prepare(parse_records(records), tokenizer, TrainSettings(max_length=64, eval_fraction=0), [EOS])
    assert data.stats.truncated == 1
    long = next(t for t in data.train if t.truncated)
    assert len(long.input_ids) == 64 and long.label_tokens > 0


def test_prompt_filling_max_length_is_refused_with_its_line(tmp_path, tokenizer):
    path = write_lines(tmp_path, [GOOD, json.dumps({"prompt": "long " * 300, "completion": "c"})])
    with pytest.raises(InvalidArgument, match="line 2: .*max_length=64"):
        prepare(read_jsonl(path), tokenizer, TrainSettings(max_length=64), [EOS])


def test_split_is_deterministic_by_seed():
    train, held = split_indices(50, 0.1, seed=7)
    assert (train, held) == split_indices(50, 0.1, seed=7)
    assert len(held) == 5 and sorted(train + held) == list(range(50))
    assert held != split_indices(50, 0.1, seed=8)[1]
    assert split_indices(10, 0.0, 1) == (list(range(10)), [])
    assert split_indices(1, 0.5, 1) == ([0], [])
    assert len(split_indices(3, 0.1, 1)[1]) == 1  # asked for evaluation: at least one example


def test_prepare_reports_stats_and_hash(tokenizer, xyzzy):
    examples = parse_records(xyzzy(20))
    data = prepare(examples, tokenizer, TrainSettings(eval_fraction=0.2, seed=3), [EOS])
    assert (data.stats.examples, data.stats.train_examples, data.stats.eval_examples) == (20, 16, 4)
    assert data.stats.truncated == 0 and data.stats.tokens == sum(len(t.input_ids) for t in data.train + data.eval)
    again = prepare(parse_records(xyzzy(20)), tokenizer, TrainSettings(eval_fraction=0.2, seed=3), [EOS])
    assert [t.input_ids for t in again.eval] == [t.input_ids for t in data.eval]
    assert data.data_hash == again.data_hash == data_hash(examples)


def test_hash_depends_on_content_not_layout(tmp_path, xyzzy):
    records = xyzzy(3)
    spaced = write_lines(tmp_path, [json.dumps(r, indent=None, separators=(" , ", " : ")) for r in records] + [""])
    assert data_hash(read_jsonl(spaced)) == data_hash(parse_records(records))
    assert data_hash(parse_records(xyzzy(3, answer="PLUGH"))) != data_hash(parse_records(records))


def test_collate_pads_on_the_right(tokenizer):
    records = [{"prompt": "p", "completion": "c"}, {"prompt": "a longer prompt", "completion": "c"}]
    data = prepare(parse_records(records), tokenizer, TrainSettings(eval_fraction=0), [EOS])
    short, long = sorted(data.train, key=lambda t: len(t.input_ids))
    batch = collate([short, long], pad_token_id=0)
    n = len(short.input_ids)
    assert batch["input_ids"].shape == (2, len(long.input_ids))
    assert batch["input_ids"][0, :n].tolist() == short.input_ids and (batch["input_ids"][0, n:] == 0).all()
    assert batch["attention_mask"][0].tolist() == [1] * n + [0] * (len(long.input_ids) - n)
    assert (batch["labels"][0, n:] == IGNORE).all() and batch["labels"][1].tolist() == long.labels
