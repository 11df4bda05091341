"""Entity tagging: text -> words -> tokens, and BIO word tags -> entities (and back).

A tagging example is labelled per word, not per token: word boundaries are stable under any
tokenizer, so one dataset serves every base model, and the entity spans a client sends (character
offsets) must fall on word boundaries to be representable at all. The model reads the words joined
by single spaces; each word is labelled at its first token and the other tokens of the word are
left out of the loss (Transformers' token-classification practice).

Entities are merged from BIO tags the way seqeval does by default (non-strict, IOB2 with IOB1's
"I- after O starts an entity"), so what the server returns and what the trainer's entity metrics
count (trainer/task_metrics.py uses bio_entities) are the same entities.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass

from loraserve.core.errors import InvalidArgument

OUTSIDE = "O"


def _ranges(codepoints: Iterable[int]) -> str:
    """A regex character-class body for the given ascending code points, as compact ranges."""
    parts: list[str] = []
    start = prev = None
    for cp in codepoints:
        if prev is not None and cp == prev + 1:
            prev = cp
            continue
        if start is not None:
            parts.append(_range(start, prev))
        start = prev = cp
    if start is not None:
        parts.append(_range(start, prev))
    return "".join(parts)


def _range(first: int, last: int) -> str:
    return re.escape(chr(first)) if first == last else f"{re.escape(chr(first))}-{re.escape(chr(last))}"


def _categories(prefix: str) -> str:
    """Code points whose Unicode category starts with prefix (planes 0-1 and the variation-selector
    supplement, where all marks and format characters live), as a class body. Python's re has no
    \\p{M}: generated once from unicodedata so it matches the same Unicode version as \\w."""
    cps = [*range(0x20000), *range(0xE0000, 0xE0200)]
    return _ranges(cp for cp in cps if unicodedata.category(chr(cp)).startswith(prefix))


_MARKS = _categories("M")
"""Combining marks: Python's \\w leaves them out, which would cut "cafe\\u0301" (NFD) or any
Devanagari word ("हिन्दी") into pieces; they belong to the character before them."""
_FORMAT = _categories("Cf")
_JOINERS = "\u00ad\u200c\u200d\u2060"
"""Format characters that sit inside words (soft hyphen, ZWNJ as in Persian, ZWJ, word joiner).
Other format characters (zero-width space, BOM, bidi marks) and control characters separate words
and are never words themselves."""
_EMOJI_MODS = "\U0001f3fb-\U0001f3ff\U000e0020-\U000e007f"
"""Skin-tone modifiers and tag characters (subdivision flags): part of the emoji before them."""
_CJK = ("\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002a6df\U0002a700-\U0002b73f"
        "\U0002b740-\U0002b81f\U0002b820-\U0002ceaf\U0002f800-\U0002fa1f")
"""CJK ideographs, one word each (BERT's BasicTokenizer ranges): Chinese and Japanese write no
spaces, so a run of ideographs as one word would leave no entity boundary inside a sentence."""

_WCHAR = rf"[^\W{_CJK}]"
_WRUN = rf"{_WCHAR}(?:{_WCHAR}|[{_MARKS}{_JOINERS}])*"
_SYM = rf"[^\w\s{_MARKS}{_FORMAT}\x00-\x1f\x7f-\x9f{_EMOJI_MODS}]"
_SYM_TAIL = rf"[{_MARKS}{_EMOJI_MODS}]*"

WORD_RE = re.compile(
    # a run of word characters with internal apostrophes ("don't", "O'Neil"), except that a final
    # 's is its own word as in CoNLL/PTB ("France's" -> "France", "'s"): entities end before it
    rf"{_WRUN}(?:['\u2019](?![sS](?!{_WCHAR}|[{_MARKS}])){_WRUN})*"
    rf"|['\u2019][sS](?!{_WCHAR}|[{_MARKS}])"
    rf"|[{_CJK}][{_MARKS}]*"
    r"|[\U0001f1e6-\U0001f1ff]{2}"  # a regional-indicator pair: one flag
    # any other visible character alone, with its marks, and ZWJ emoji sequences whole
    rf"|{_SYM}{_SYM_TAIL}(?:\u200d{_SYM}{_SYM_TAIL})*"
)
"""Words for entity tagging, close to CoNLL tokenisation: "Paris, France." -> Paris , France ."""


def split_words(text: str) -> list[tuple[str, int, int]]:
    """(word, start, end) for each word of text, end exclusive, offsets into text: entity spans are
    checked against, and predicted entities are reported in, these offsets."""
    if not isinstance(text, str):
        raise InvalidArgument(f"text must be a string, got {type(text).__name__}")
    return [(m.group(), m.start(), m.end()) for m in WORD_RE.finditer(text)]


@dataclass(frozen=True)
class EncodedWords:
    """The model input for a list of words and where each word's tokens are.

    word_first_token has one entry per kept word (words_kept of num_words): a word whose first token
    fell at or beyond max_tokens was dropped with all words after it. token_word is None for a token
    that covers no character of any word (e.g. a lone space token between words)."""

    input_ids: list[int]
    word_first_token: list[int]
    token_word: list[int | None]
    words_kept: int
    num_words: int


def _check_words(words: list[str]) -> None:
    """Empty or all-space words have no token of their own: their label would land on a neighbour."""
    for i, word in enumerate(words):
        if not isinstance(word, str):
            raise InvalidArgument(f"word {i} must be a string, got {type(word).__name__}")
        if not word.strip():
            raise InvalidArgument(f"word {i} ({word!r}) is empty or only whitespace")


def _word_offsets(words: list[str]) -> list[tuple[int, int]]:
    """Each word's (start, end) in " ".join(words)."""
    offsets, pos = [], 0
    for word in words:
        offsets.append((pos, pos + len(word)))
        pos += len(word) + 1
    return offsets


def encode_words(tokenizer, words: list[str], max_tokens: int | None = None) -> EncodedWords:
    """Tokenize " ".join(words) (no special tokens) with a fast tokenizer's offsets and find each
    word's first token: the first token whose offset end is past the word's start, so a token that
    carries the word's leading space (" lives" -> (4, 10)) counts as the word's."""
    _check_words(words)
    if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(max_tokens, int)
                                   or max_tokens < 1):
        raise InvalidArgument(f"max_tokens must be a positive integer, got {max_tokens!r}")
    enc = tokenizer(" ".join(words), add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    offsets = [tuple(o) for o in enc["offset_mapping"]]
    spans = _word_offsets(words)

    first: list[int] = []
    t = 0
    for w, (start, end) in enumerate(spans):
        while t < len(offsets) and offsets[t][1] <= start:
            t += 1
        if t == len(offsets) or offsets[t][0] >= end:
            raise InvalidArgument(f"word {w} ({words[w]!r}) has no token of its own")
        first.append(t)

    token_word: list[int | None] = []
    w = 0
    for tok_start, tok_end in offsets:
        while w < len(spans) and spans[w][1] <= tok_start:
            w += 1
        overlaps = w < len(spans) and spans[w][0] < tok_end and tok_start < tok_end
        token_word.append(w if overlaps else None)

    if max_tokens is not None:
        first = [f for f in first if f < max_tokens]
        ids, token_word = ids[:max_tokens], token_word[:max_tokens]
    return EncodedWords(input_ids=ids, word_first_token=first, token_word=token_word,
                        words_kept=len(first), num_words=len(words))


def align_labels(encoded: EncodedWords, word_labels: list[int], ignore: int = -100) -> list[int]:
    """Per-token labels: each kept word's label at its first token, `ignore` on every other token,
    so each word counts once in the loss however many tokens it has. Labels of dropped words are
    unused."""
    if len(word_labels) != encoded.num_words:
        raise InvalidArgument(f"{len(word_labels)} labels for {encoded.num_words} words")
    labels = [ignore] * len(encoded.input_ids)
    for w, t in enumerate(encoded.word_first_token):
        if labels[t] == ignore:  # two words sharing a first token: the first one keeps it
            labels[t] = word_labels[w]
    return labels


def _span_text(text: str, start, end) -> str:
    """A short quote of text[start:end] for an error message."""
    piece = text[start:end] if isinstance(start, int) and isinstance(end, int) else ""
    return _short(piece)


def _short(piece: str) -> str:
    return piece if len(piece) <= 40 else piece[:37] + "..."


def _quote(value) -> str:
    """A short quote of a value a request gave, for an error message."""
    return f'"{_short(value)}"' if isinstance(value, str) else f"not a string ({type(value).__name__})"


def _check_entity(i: int, entity, text: str, labels: Collection[str] | None) -> tuple[int, int, str]:
    """(start, end, label) of one entity, or InvalidArgument naming entity i and what is wrong."""
    if not isinstance(entity, Mapping):
        raise InvalidArgument(f"entity {i} must be an object with start, end and label")
    missing = [k for k in ("start", "end", "label") if k not in entity]
    if missing:
        raise InvalidArgument(f"entity {i} is missing {', '.join(missing)}")
    start, end, label = entity["start"], entity["end"], entity["label"]
    for name, value in (("start", start), ("end", end)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise InvalidArgument(f"entity {i}: {name} must be an integer, got {value!r}")
    if not isinstance(label, str) or not label or label != label.strip():
        raise InvalidArgument(f"entity {i}: label must be a non-empty string without surrounding "
                              f"spaces, got {label!r}")
    if labels is not None and label not in labels:
        raise InvalidArgument(f"entity {i}: label {label!r} is not one of {sorted(labels)}")
    if start < 0 or end > len(text):
        raise InvalidArgument(f"entity {i} ({start}..{end}) is outside its text of {len(text)} "
                              "characters")
    if start >= end:
        raise InvalidArgument(f"entity {i}: start {start} must be before end {end}")
    if "text" in entity and entity["text"] != text[start:end]:
        # Offsets counted in bytes or UTF-16 units, or off by one, would quietly tag the wrong words.
        raise InvalidArgument(f'entity {i} ({start}..{end}) says its text is {_quote(entity["text"])}, but the '
                              f'text there is "{_span_text(text, start, end)}" (offsets count Unicode code points)')
    return start, end, label


def entities_to_word_tags(text: str, entities: list[dict], labels: Collection[str] | None = None
                          ) -> tuple[list[tuple[str, int, int]], list[str]]:
    """(split_words(text), one BIO tag per word) for an example {"text", "entities": [{"start",
    "end", "label"}]} with character offsets (end exclusive). Each span must start at a word start
    and end at a word end, and spans may not overlap: anything else has no BIO encoding, and
    silently snapping it to words would train on labels the client never gave. labels, when given,
    are the allowed entity types."""
    if not isinstance(entities, list):
        raise InvalidArgument(f"entities must be a list, got {type(entities).__name__}")
    words = split_words(text)
    starts = {s: w for w, (_, s, _e) in enumerate(words)}
    ends = {e: w for w, (_, _s, e) in enumerate(words)}
    spans = []
    for i, entity in enumerate(entities):
        start, end, label = _check_entity(i, entity, text, labels)
        if start not in starts or end not in ends:
            raise InvalidArgument(f'entity {i} ({start}..{end} "{_span_text(text, start, end)}") '
                                  "does not start and end on word boundaries")
        spans.append((start, end, i, label))
    spans.sort()
    for (s0, e0, i0, _), (s1, e1, i1, _) in zip(spans, spans[1:]):
        if s1 < e0:
            raise InvalidArgument(f"entity {i1} ({s1}..{e1}) overlaps entity {i0} ({s0}..{e0})")
    tags = [OUTSIDE] * len(words)
    for start, end, _, label in spans:
        first, last = starts[start], ends[end]
        tags[first] = f"B-{label}"
        for w in range(first + 1, last + 1):
            tags[w] = f"I-{label}"
    return words, tags


def check_bio(tags: list[str], allowed_types: set[str] | None = None, ids: bool = False) -> None:
    """InvalidArgument unless every tag is O, B-<type> or I-<type> (with an allowed type when
    allowed_types is given; with ids, a non-negative integer class id also passes, to be named
    later). An I- tag after O or after another type is accepted (IOB1 style): it begins an entity,
    as in seqeval's default mode, so predicted sequences are never rejected."""
    for i, tag in enumerate(tags):
        if tag == OUTSIDE:
            continue
        if ids and isinstance(tag, int) and not isinstance(tag, bool):
            if tag < 0:
                raise InvalidArgument(f"tag {i} ({tag}) is a negative class id")
            continue
        if not isinstance(tag, str) or len(tag) < 3 or tag[:2] not in ("B-", "I-"):
            raise InvalidArgument(f"tag {i} ({tag!r}) is not O, B-<type> or I-<type>")
        if allowed_types is not None and tag[2:] not in allowed_types:
            raise InvalidArgument(f"tag {i} ({tag!r}): type {tag[2:]!r} is not one of "
                                  f"{sorted(allowed_types)}")


def bio_entities(tags: list[str]) -> list[tuple[str, int, int]]:
    """(type, first, last) word indices (inclusive) of the entities in valid BIO tags, exactly as
    seqeval's get_entities: B- starts an entity; I- continues the entity before it only if that one
    has the same type, else (after O, or after another type) it starts a new one; O ends one."""
    found: list[tuple[str, int, int]] = []
    current: str | None = None
    begin = 0
    for i, tag in enumerate(tags):
        kind = None if tag == OUTSIDE else tag[2:]
        if current is not None and (kind != current or tag.startswith("B-")):
            found.append((current, begin, i - 1))
            current = None
        if kind is not None and current is None:
            current, begin = kind, i
    if current is not None:
        found.append((current, begin, len(tags) - 1))
    return found


@dataclass(frozen=True)
class Entity:
    """One predicted entity: character offsets into the original text (end exclusive), and the
    mean of its words' scores."""

    label: str
    start: int
    end: int
    text: str
    score: float


def _joined(words: list[tuple[str, int, int]]) -> str:
    """Consecutive words with each gap between them as that many spaces."""
    out, pos = [], words[0][1]
    for word, start, end in words:
        out.append(" " * (start - pos) + word)
        pos = end
    return "".join(out)


def word_spans_to_entities(words_with_offsets: list[tuple[str, int, int]], tags: list[str],
                           scores: list[float], text: str | None = None) -> list[Entity]:
    """Entities from one BIO tag and score per word (split_words' words), merged as bio_entities
    does. Entity.text is text[start:end] when the original text is given, else the words with the
    gaps between them as spaces (the original whitespace is not in the words)."""
    if not len(words_with_offsets) == len(tags) == len(scores):
        raise InvalidArgument(f"{len(words_with_offsets)} words, {len(tags)} tags and "
                              f"{len(scores)} scores: one of each per word")
    check_bio(tags)
    entities = []
    for kind, first, last in bio_entities(tags):
        start, end = words_with_offsets[first][1], words_with_offsets[last][2]
        piece = text[start:end] if text is not None else _joined(words_with_offsets[first:last + 1])
        mean = sum(scores[first:last + 1]) / (last - first + 1)
        entities.append(Entity(label=kind, start=start, end=end, text=piece, score=float(mean)))
    return entities
