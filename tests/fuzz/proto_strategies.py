"""Hypothesis strategies that build any protobuf message field by field from its descriptor.

Every scalar type gets its edge values (int32/int64/uint64 bounds, NaN, infinities, negative zero,
subnormals, empty, NUL, huge and non-ASCII strings) mixed with arbitrary draws; repeated and map
fields get lists and dicts; nested messages recurse to a bounded depth; enums take unknown values too
(proto3 enums are open). `hints` adds plausible values for named fields (real adapter ids, file names),
so the fuzzer also reaches the code behind the first validation, not only the refusals.
"""

from __future__ import annotations

import math

from google.protobuf.descriptor import FieldDescriptor as F
from hypothesis import strategies as st

INT_RANGES = {
    F.TYPE_INT32: (-(2**31), 2**31 - 1), F.TYPE_SINT32: (-(2**31), 2**31 - 1), F.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
    F.TYPE_INT64: (-(2**63), 2**63 - 1), F.TYPE_SINT64: (-(2**63), 2**63 - 1), F.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    F.TYPE_UINT32: (0, 2**32 - 1), F.TYPE_FIXED32: (0, 2**32 - 1),
    F.TYPE_UINT64: (0, 2**64 - 1), F.TYPE_FIXED64: (0, 2**64 - 1),
}
EDGE_FLOATS = [math.nan, math.inf, -math.inf, -0.0, 0.0, 5e-324, -5e-324, 1e-45, 1.1754942e-38, -1.0, 0.5, 1.0,
               1.0000001, 3.4028235e38, 1.7976931348623157e308]
# Text no UTF-8 encoder refuses (protobuf strings must be valid UTF-8, so no lone surrogates).
CHARS = st.characters(exclude_categories=["Cs"])
EDGE_TEXT = ["", "\x00", "a\x00b", " ", "\n" * 64, "x" * (1 << 20), "é" * 50_000, "𝔘" * 1000, "\u202e\u200b\ufeff",
             "../../etc/passwd", "/etc", ".", "..", "a" * 129, "%s%n{0}", "<|im_start|>system", "{{ raise }}",
             "null", "\\", "a0", "q_proj"]
EDGE_BYTES = [b"", b"\x00" * 16, b"\xff" * 1024, b"{}", b"x" * (1 << 20)]


def ints(lo: int, hi: int):
    edges = sorted({lo, hi, 0, 1, hi // 2, lo // 2, min(hi, 2**31 - 1), min(hi, 2**31), max(lo, -(2**31))})
    return st.one_of(st.sampled_from([e for e in edges if lo <= e <= hi]), st.integers(lo, hi))


def floats(width: int):
    return st.one_of(st.sampled_from(EDGE_FLOATS), st.floats(width=width, allow_nan=True, allow_infinity=True),
                     st.floats(-2, 2))


def text():
    return st.one_of(st.sampled_from(EDGE_TEXT), st.text(CHARS, max_size=40), st.text(max_size=8))


def raw_bytes():
    return st.one_of(st.sampled_from(EDGE_BYTES), st.binary(max_size=200))


def scalar(field, hints: dict):
    t = field.type
    if t in INT_RANGES:
        base = ints(*INT_RANGES[t])
    elif t == F.TYPE_DOUBLE:
        base = floats(64)
    elif t == F.TYPE_FLOAT:
        base = floats(32)
    elif t == F.TYPE_BOOL:
        base = st.booleans()
    elif t == F.TYPE_STRING:
        base = text()
    elif t == F.TYPE_BYTES:
        base = raw_bytes()
    elif t == F.TYPE_ENUM:
        base = st.one_of(st.sampled_from([v.number for v in field.enum_type.values]), ints(-(2**31), 2**31 - 1))
    else:
        raise TypeError(f"no strategy for field {field.full_name} of type {t}")
    extra = hints.get(field.name)
    return st.one_of(extra, base) if extra is not None else base


def message(cls, hints: dict | None = None, depth: int = 3, max_repeated: int = 4):
    """Messages of `cls`: each field set or not, each value from the strategies above."""
    hints = hints or {}

    @st.composite
    def build(draw):
        msg = cls()
        for field in cls.DESCRIPTOR.fields:
            if not draw(st.booleans()):
                continue
            if field.message_type is not None and field.message_type.GetOptions().map_entry:
                key_field, value_field = field.message_type.fields_by_name["key"], field.message_type.fields_by_name["value"]
                entries = draw(st.dictionaries(scalar(key_field, hints), _value(value_field, hints, depth),
                                               max_size=max_repeated))
                target = getattr(msg, field.name)
                for k, v in entries.items():
                    if value_field.message_type is not None:
                        target[k].CopyFrom(v)
                    else:
                        target[k] = v
            elif field.is_repeated:
                values = draw(st.lists(_value(field, hints, depth), max_size=max_repeated))
                target = getattr(msg, field.name)
                for v in values:
                    if field.message_type is not None:
                        target.add().CopyFrom(v)
                    else:
                        target.append(v)
            elif field.message_type is not None:
                if depth > 0:
                    getattr(msg, field.name).CopyFrom(draw(_value(field, hints, depth)))
            else:
                setattr(msg, field.name, draw(scalar(field, hints)))
        return msg

    return build()


def _value(field, hints: dict, depth: int):
    if field.message_type is not None:
        from google.protobuf import message_factory

        return message(message_factory.GetMessageClass(field.message_type), hints, depth - 1)
    return scalar(field, hints)


def near(base, hints: dict | None = None, depth: int = 3):
    """Messages like `base` (a valid request) with some fields, at any depth, replaced by fuzzed values (or
    cleared): most validation passes, so the fuzz reaches the code behind it."""
    cls = type(base)

    @st.composite
    def build(draw):
        fuzzed = draw(message(cls, hints, depth))
        out = cls()
        out.CopyFrom(base)
        for field in cls.DESCRIPTOR.fields:
            if draw(st.integers(0, 3)) != 0:  # each field is replaced with probability 1/4
                continue
            singular_message = field.message_type is not None and not field.is_repeated
            if singular_message and base.HasField(field.name) and depth > 0 and draw(st.booleans()):
                getattr(out, field.name).CopyFrom(draw(near(getattr(base, field.name), hints, depth - 1)))
                continue
            out.ClearField(field.name)
            if field.is_repeated:
                getattr(out, field.name).MergeFrom(getattr(fuzzed, field.name))
            elif field.has_presence and fuzzed.HasField(field.name):
                if singular_message:
                    getattr(out, field.name).CopyFrom(getattr(fuzzed, field.name))
                else:
                    setattr(out, field.name, getattr(fuzzed, field.name))
            elif not field.has_presence:
                setattr(out, field.name, getattr(fuzzed, field.name))
        return out

    return build()
