"""Entity-tagging words: splitting, token alignment on the real tokenizer, BIO tags <-> entities."""

from __future__ import annotations

import re

import pytest
from loraserve.core.errors import InvalidArgument
from loraserve.core.tasks.words import (
    Entity,
    align_labels,
    bio_entities,
    check_bio,
    encode_words,
    entities_to_word_tags,
    split_words,
    word_spans_to_entities,
)

SENTENCE = "John lives in Paris, France."
WORDS = ["John", "lives", "in", "Paris", ",", "France", "."]


@pytest.fixture(scope="module")
def tok():
    from loraserve.core.model.load import ensure_embedded_model
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(ensure_embedded_model())


def words_of(text: str) -> list[str]:
    return [w for w, _, _ in split_words(text)]


# --- split_words -------------------------------------------------------------------------------

def test_split_words_offsets_are_conll_like():
    assert split_words("Paris, France.") == [("Paris", 0, 5), (",", 5, 6), ("France", 7, 13),
                                             (".", 13, 14)]
    assert words_of(SENTENCE) == WORDS
    text = "  a\t\nb  "
    assert [(w, text[s:e]) for w, s, e in split_words(text)] == [("a", "a"), ("b", "b")]


def test_split_words_empty_and_blank():
    assert split_words("") == []
    assert split_words(" \t\n\u00a0\u200b") == []  # NBSP is \s; zero-width space separates


def test_apostrophes_inside_words_but_possessive_split_off():
    assert words_of("don't O'Neil's France's it\u2019s 'sup Paris'") == [
        "don't", "O'Neil", "'s", "France", "'s", "it", "\u2019s", "'", "sup", "Paris", "'"]
    assert words_of("'s") == ["'s"]
    assert words_of("James's") == ["James", "'s"]
    assert words_of("It'sy") == ["It'sy"]  # not a final 's


def test_punctuation_each_char_alone_and_numbers_split():
    assert words_of("(U.S.)!?") == ["(", "U", ".", "S", ".", ")", "!", "?"]
    assert words_of("3.14 $5 e-mail snake_case") == ["3", ".", "14", "$", "5", "e", "-", "mail",
                                                     "snake_case"]


def test_unicode_words():
    assert words_of("café Zürich naïve") == ["café", "Zürich", "naïve"]
    # NFD: the combining accent stays on its letter (Python's \w alone would cut it off)
    assert words_of("cafe\u0301 ok") == ["cafe\u0301", "ok"]
    assert words_of("हिन्दी भाषा") == ["हिन्दी", "भाषा"]  # Devanagari vowel signs are marks
    # each CJK ideograph is a word (BERT's rule), a kana run is one word
    assert words_of("東京タワーへ行く") == ["東", "京", "タワーへ", "行", "く"]
    assert words_of("北京是中国的首都。") == ["北", "京", "是", "中", "国", "的", "首", "都", "。"]
    assert words_of("Привет, мир") == ["Привет", ",", "мир"]


def test_emoji_stay_whole():
    family = "\U0001f468\u200d\U0001f469\u200d\U0001f467"
    thumbs = "\U0001f44d\U0001f3fd"  # with a skin-tone modifier
    heart = "\u2764\ufe0f"  # with the emoji variation selector
    assert words_of(f"I {heart} NY{thumbs}! {family} \U0001f1eb\U0001f1f7\U0001f1e9\U0001f1ea") == [
        "I", heart, "NY", thumbs, "!", family, "\U0001f1eb\U0001f1f7", "\U0001f1e9\U0001f1ea"]
    assert words_of("1\ufe0f\u20e3") == ["1\ufe0f\u20e3"]  # keycap


def test_format_characters_are_not_words():
    assert words_of("\ufeffhello\u200e world\u200b!") == ["hello", "world", "!"]
    assert words_of("co\u00adoperate") == ["co\u00adoperate"]  # soft hyphen inside a word
    assert words_of("a\x00b") == ["a", "b"]


def test_split_words_rejects_non_string():
    with pytest.raises(InvalidArgument, match="text must be a string"):
        split_words(None)


# --- encode_words / align_labels ---------------------------------------------------------------

def test_tokenizer_is_the_one_described(tok):
    enc = tok(SENTENCE, add_special_tokens=False, return_offsets_mapping=True)
    assert enc["input_ids"] == [9682, 2397, 281, 7042, 28, 4649, 30]
    assert [tuple(o) for o in enc["offset_mapping"]] == [(0, 4), (4, 10), (10, 13), (13, 19),
                                                         (19, 20), (20, 27), (27, 28)]


def test_encode_one_token_per_word(tok):
    enc = encode_words(tok, WORDS)
    # "John lives in Paris , France ." : "Ġ," is 3297 and "Ġ." 1673 (a space before them now)
    assert enc.input_ids == [9682, 2397, 281, 7042, 3297, 4649, 1673]
    assert enc.word_first_token == [0, 1, 2, 3, 4, 5, 6]
    assert enc.token_word == [0, 1, 2, 3, 4, 5, 6]
    assert (enc.words_kept, enc.num_words) == (7, 7)
    assert align_labels(enc, [1, 0, 0, 2, 0, 2, 0]) == [1, 0, 0, 2, 0, 2, 0]


def test_encode_multi_token_words(tok):
    # tokens: Z, Ã¼ (ü), rich, Ġis, Ġin, ĠSchwe, iz
    enc = encode_words(tok, ["Zürich", "is", "in", "Schweiz"])
    assert enc.input_ids == [74, 7170, 5130, 314, 281, 46760, 463]
    assert enc.word_first_token == [0, 3, 4, 5]
    assert enc.token_word == [0, 0, 0, 1, 2, 3, 3]
    assert align_labels(enc, [1, 0, 0, 2]) == [1, -100, -100, 0, 0, 2, -100]
    assert align_labels(enc, [1, 0, 0, 2], ignore=-1) == [1, -1, -1, 0, 0, 2, -1]


def test_encode_long_word(tok):
    enc = encode_words(tok, ["a", "x" * 50, "b"])
    # "a", then "Ġxxx" + 12 more pieces of the x run, then "Ġb": the long word owns all between
    assert enc.word_first_token[:2] == [0, 1]
    n = len(enc.input_ids)
    assert n > 10 and enc.word_first_token[2] == n - 1
    assert enc.token_word == [0] + [1] * (n - 2) + [2]
    assert align_labels(enc, [3, 4, 5]) == [3, 4] + [-100] * (n - 3) + [5]


def test_encode_cjk_space_tokens_belong_to_no_word(tok):
    enc = encode_words(tok, ["東", "京", "タワー"])
    # 東 = 2 byte tokens, then a lone "Ġ" (the joining space) before 京's 2 tokens, etc.
    assert enc.word_first_token == [0, 3, 6]
    assert enc.token_word == [0, 0, None, 1, 1, None, 2, 2, 2, 2, 2]
    assert align_labels(enc, [1, 2, 3]) == [1, -100, -100, 2, -100, -100, 3] + [-100] * 4


def test_encode_emoji(tok):
    enc = encode_words(tok, ["I", "\u2764\ufe0f", "\U0001f1eb\U0001f1f7"])
    assert enc.word_first_token == [0, 1, 5]
    assert enc.token_word == [0, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2]


@pytest.mark.parametrize("text", [SENTENCE, "Zürich ist schön, sagt Ærøskøbing's Bürgermeister.",
                                  "東京タワーへ行く 🙂 👨\u200d👩\u200d👧 cafe\u0301",
                                  "Supercalifragilisticexpialidocious antidisestablishmentarianism"])
def test_each_words_tokens_decode_to_it(tok, text):
    """Whatever the split, the tokens attributed to a word are exactly that word's bytes."""
    words = words_of(text)
    enc = encode_words(tok, words)
    assert len(enc.word_first_token) == len(words)
    for w, word in enumerate(words):
        ids = [i for i, tw in zip(enc.input_ids, enc.token_word) if tw == w]
        assert tok.decode(ids).strip() == word
        assert enc.token_word[enc.word_first_token[w]] == w
    # the unattributed tokens are only spaces
    rest = [i for i, tw in zip(enc.input_ids, enc.token_word) if tw is None]
    assert tok.decode(rest).strip() == ""


def test_encode_empty_word_list(tok):
    enc = encode_words(tok, [])
    assert (enc.input_ids, enc.word_first_token, enc.token_word) == ([], [], [])
    assert (enc.words_kept, enc.num_words) == (0, 0)
    assert align_labels(enc, []) == []
    assert encode_words(tok, [], max_tokens=3).words_kept == 0


def test_max_tokens_drops_words_past_the_cut(tok):
    words = ["Zürich", "is", "in", "Schweiz"]  # first tokens 0, 3, 4, 5 of 7
    enc = encode_words(tok, words, max_tokens=4)
    assert enc.input_ids == [74, 7170, 5130, 314]
    assert enc.word_first_token == [0, 3]
    assert enc.token_word == [0, 0, 0, 1]
    assert (enc.words_kept, enc.num_words) == (2, 4)
    assert align_labels(enc, [1, 2, 3, 4]) == [1, -100, -100, 2]

    # word 3 starts at token 5 < 6: kept, though its second token is cut
    enc = encode_words(tok, words, max_tokens=6)
    assert enc.words_kept == 4 and enc.input_ids == [74, 7170, 5130, 314, 281, 46760]
    assert align_labels(enc, [1, 2, 3, 4]) == [1, -100, -100, 2, 3, 4]

    enc = encode_words(tok, words, max_tokens=1)
    assert (enc.input_ids, enc.word_first_token, enc.words_kept) == ([74], [0], 1)

    assert encode_words(tok, words, max_tokens=100) == encode_words(tok, words)


def test_encode_rejects_bad_input(tok):
    with pytest.raises(InvalidArgument, match="word 1 .* empty or only whitespace"):
        encode_words(tok, ["a", "", "b"])
    with pytest.raises(InvalidArgument, match="word 0"):
        encode_words(tok, [" \t"])
    with pytest.raises(InvalidArgument, match="word 0 must be a string"):
        encode_words(tok, [3])
    for bad in (0, -1, True, 2.0):
        with pytest.raises(InvalidArgument, match="max_tokens"):
            encode_words(tok, ["a"], max_tokens=bad)


def test_align_labels_needs_one_label_per_word(tok):
    enc = encode_words(tok, ["a", "b"], max_tokens=1)
    with pytest.raises(InvalidArgument, match="1 labels for 2 words"):
        align_labels(enc, [0])


# --- entities -> word tags ---------------------------------------------------------------------

def test_entities_to_word_tags():
    entities = [{"start": 21, "end": 27, "label": "LOC"}, {"start": 0, "end": 4, "label": "PER"},
                {"start": 14, "end": 19, "label": "LOC"}]
    words, tags = entities_to_word_tags(SENTENCE, entities)
    assert words == split_words(SENTENCE)
    assert tags == ["B-PER", "O", "O", "B-LOC", "O", "B-LOC", "O"]

    text = "She met the New York City mayor's aide."
    start = text.index("New")
    words, tags = entities_to_word_tags(text, [{"start": start, "end": start + 13, "label": "LOC"}],
                                        labels={"LOC", "PER"})
    assert [w for w, _, _ in words] == ["She", "met", "the", "New", "York", "City", "mayor", "'s",
                                       "aide", "."]
    assert tags == ["O", "O", "O", "B-LOC", "I-LOC", "I-LOC", "O", "O", "O", "O"]

    # adjacent entities: the second begins with B-
    words, tags = entities_to_word_tags("Paris France", [{"start": 0, "end": 5, "label": "LOC"},
                                                         {"start": 6, "end": 12, "label": "LOC"}])
    assert tags == ["B-LOC", "B-LOC"]
    assert entities_to_word_tags("", []) == ([], [])
    assert entities_to_word_tags("no entities", [])[1] == ["O", "O"]


def test_entity_possessive_and_unicode_spans():
    text = "Björk's album 東京"
    entities = [{"start": 0, "end": 5, "label": "PER"}, {"start": 14, "end": 16, "label": "LOC"}]
    words, tags = entities_to_word_tags(text, entities)
    assert [w for w, _, _ in words] == ["Björk", "'s", "album", "東", "京"]
    assert tags == ["B-PER", "O", "O", "B-LOC", "I-LOC"]


@pytest.mark.parametrize("entities, message", [
    ([{"start": 0, "end": 4, "label": "PER"}, {"start": 21, "end": 27, "label": "LOC"},
      {"start": 15, "end": 20, "label": "LOC"}],
     'entity 2 (15..20 "aris,") does not start and end on word boundaries'),
    ([{"start": 14, "end": 18, "label": "LOC"}],
     'entity 0 (14..18 "Pari") does not start and end on word boundaries'),
    ([{"start": 13, "end": 19, "label": "LOC"}], 'entity 0 (13..19 " Paris") does not start'),
    ([{"start": 5, "end": 8, "label": "X"}], 'entity 0 (5..8 "liv")'),
    ([{"start": 20, "end": 30, "label": "LOC"}], "entity 0 (20..30) is outside its text of 28"),
    ([{"start": -1, "end": 4, "label": "PER"}], "entity 0 (-1..4) is outside"),
    ([{"start": 4, "end": 4, "label": "PER"}], "entity 0: start 4 must be before end 4"),
    ([{"start": 5, "end": 0, "label": "PER"}], "entity 0: start 5 must be before end 0"),
    ([{"start": 14, "end": 27, "label": "LOC"}, {"start": 21, "end": 27, "label": "LOC"}],
     "entity 1 (21..27) overlaps entity 0 (14..27)"),
    ([{"start": 21, "end": 27, "label": "LOC"}, {"start": 14, "end": 27, "label": "LOC"}],
     "entity 0 (21..27) overlaps entity 1 (14..27)"),
    ([{"start": 0, "end": 4, "label": "PER"}, {"start": 0, "end": 4, "label": "PER"}], "overlaps"),
    ([{"start": 0, "end": 4, "label": 7}], "entity 0: label must be a non-empty string"),
    ([{"start": 0, "end": 4, "label": ""}], "entity 0: label must be"),
    ([{"start": 0, "end": 4, "label": " PER"}], "entity 0: label must be"),
    ([{"start": 0, "end": 4}], "entity 0 is missing label"),
    ([{"start": True, "end": 4, "label": "PER"}], "entity 0: start must be an integer"),
    ([{"start": 0, "end": "4", "label": "PER"}], "entity 0: end must be an integer"),
    (["John"], "entity 0 must be an object"),
    ([{"start": 14, "end": 19, "label": "LOC", "text": "Lisbon"}],
     'entity 0 (14..19) says its text is "Lisbon", but the text there is "Paris" (offsets count Unicode code points)'),
    ([{"start": 0, "end": 4, "label": "PER", "text": 4}], "entity 0 (0..4) says its text is not a string (int)"),
])
def test_entities_to_word_tags_rejects(entities, message):
    with pytest.raises(InvalidArgument, match=re.escape(message)):
        entities_to_word_tags(SENTENCE, entities)


def test_an_entity_text_that_matches_its_span_is_accepted():
    words, tags = entities_to_word_tags(SENTENCE, [{"start": 0, "end": 4, "label": "PER", "text": "John"},
                                                   {"start": 14, "end": 19, "label": "LOC"}])
    assert tags[:4] == ["B-PER", "O", "O", "B-LOC"]


def test_entity_label_must_be_allowed():
    with pytest.raises(InvalidArgument, match=r"entity 0: label 'ORG' is not one of \['LOC', 'PER'\]"):
        entities_to_word_tags(SENTENCE, [{"start": 0, "end": 4, "label": "ORG"}], labels={"PER", "LOC"})
    with pytest.raises(InvalidArgument, match="entities must be a list"):
        entities_to_word_tags(SENTENCE, {"start": 0})


# --- BIO ---------------------------------------------------------------------------------------

def test_check_bio_accepts_bio_and_iob1():
    check_bio([])
    check_bio(["O", "B-PER", "I-PER", "O", "I-LOC", "I-PER", "B-WORK-OF-ART"])
    check_bio(["B-PER", "I-PER"], allowed_types={"PER"})


@pytest.mark.parametrize("tag", ["B", "I-", "B-", "b-PER", "X-PER", "E-PER", "S-LOC", "o", "",
                                 "BPER", None, 1])
def test_check_bio_names_the_bad_tag(tag):
    with pytest.raises(InvalidArgument, match=r"tag 1 \(.*\) is not O, B-<type> or I-<type>"):
        check_bio(["O", tag])


def test_check_bio_allowed_types():
    with pytest.raises(InvalidArgument, match=r"tag 2 \('I-ORG'\): type 'ORG' is not one of"):
        check_bio(["B-PER", "I-PER", "I-ORG"], allowed_types={"PER", "LOC"})


@pytest.mark.parametrize("tags, expected", [
    ([], []),
    (["O", "O"], []),
    (["B-PER", "I-PER", "O", "B-LOC"], [("PER", 0, 1), ("LOC", 3, 3)]),
    (["I-PER", "I-PER", "O"], [("PER", 0, 1)]),  # I- at the start begins an entity
    (["O", "I-MISC"], [("MISC", 1, 1)]),  # I- after O begins one; the end closes it
    (["B-PER", "I-LOC", "I-LOC"], [("PER", 0, 0), ("LOC", 1, 2)]),  # type change: new entity
    (["I-PER", "I-LOC", "I-PER"], [("PER", 0, 0), ("LOC", 1, 1), ("PER", 2, 2)]),
    (["B-PER", "B-PER", "I-PER"], [("PER", 0, 0), ("PER", 1, 2)]),  # B- always begins
    (["I-PER", "B-PER"], [("PER", 0, 0), ("PER", 1, 1)]),
    (["B-WORK-OF-ART", "I-WORK-OF-ART"], [("WORK-OF-ART", 0, 1)]),
])
def test_bio_entities_like_seqeval(tags, expected):
    assert bio_entities(tags) == expected


# --- word tags -> entities ---------------------------------------------------------------------

def test_word_spans_to_entities():
    words = split_words(SENTENCE)
    tags = ["B-PER", "O", "O", "B-LOC", "O", "B-LOC", "O"]
    scores = [0.9, 0.1, 0.1, 0.8, 0.2, 0.7, 0.3]
    assert word_spans_to_entities(words, tags, scores, text=SENTENCE) == [
        Entity("PER", 0, 4, "John", 0.9), Entity("LOC", 14, 19, "Paris", 0.8),
        Entity("LOC", 21, 27, "France", 0.7)]


def test_word_spans_to_entities_multi_word_text_and_scores():
    text = "in  New\tYork City, now"
    words = split_words(text)  # in, New, York, City, ",", now
    tags = ["O", "B-LOC", "I-LOC", "I-LOC", "O", "I-MISC"]
    scores = [1.0, 0.5, 1.0, 0.75, 1.0, 0.25]
    with_text = word_spans_to_entities(words, tags, scores, text=text)
    assert with_text == [Entity("LOC", 4, 17, "New\tYork City", 0.75),  # (0.5 + 1 + 0.75) / 3
                         Entity("MISC", 19, 22, "now", 0.25)]
    without = word_spans_to_entities(words, tags, scores)
    assert [e.text for e in without] == ["New York City", "now"]
    assert [(e.start, e.end) for e in without] == [(4, 17), (19, 22)]


def test_word_spans_to_entities_iob1_and_type_change():
    text = "Acme Corp Paris"
    words = split_words(text)
    got = word_spans_to_entities(words, ["I-ORG", "I-ORG", "I-LOC"], [1.0, 0.0, 0.5], text=text)
    assert got == [Entity("ORG", 0, 9, "Acme Corp", 0.5), Entity("LOC", 10, 15, "Paris", 0.5)]
    assert word_spans_to_entities([], [], []) == []


def test_word_spans_to_entities_rejects():
    words = split_words("a b")
    with pytest.raises(InvalidArgument, match="2 words, 1 tags and 2 scores"):
        word_spans_to_entities(words, ["O"], [0.0, 0.0])
    with pytest.raises(InvalidArgument, match="tag 0"):
        word_spans_to_entities(words, ["PER", "O"], [0.0, 0.0])
