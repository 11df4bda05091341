"""Incremental detokenization, stop sequences and per-row sampling."""

from __future__ import annotations

import torch
from loraserve.server.engine.detokenize import TextStream
from loraserve.server.engine.sampling import RowSampler, filter_logits, sample
from transformers import AutoTokenizer


def stream_all(tok, text, stop=()):
    s = TextStream(tok, stop)
    out = "".join(s.add(t) for t in tok(text, add_special_tokens=False)["input_ids"])
    return out + s.finish(), s


def test_deltas_reassemble_unicode_exactly(embedded_model_dir):
    tok = AutoTokenizer.from_pretrained(embedded_model_dir)
    text = "Grüße aus Köln — 東京 🙂 done."
    out, _ = stream_all(tok, text)
    assert out == text


def test_stop_sequence_is_cut_and_never_leaks(embedded_model_dir):
    tok = AutoTokenizer.from_pretrained(embedded_model_dir)
    s = TextStream(tok, ("END",))
    emitted = []
    for t in tok("alpha beta ENDING gamma", add_special_tokens=False)["input_ids"]:
        emitted.append(s.add(t))
        if s.stopped:
            break
    assert s.stopped and "".join(emitted) + s.finish() == "alpha beta "
    assert all("E" not in e for e in emitted)
    out, s2 = stream_all(tok, "no stop here, just EN", ("END",))
    assert out == "no stop here, just EN" and not s2.stopped  # a held-back prefix is released at the end


def test_sampling_settings():
    torch.manual_seed(0)
    logits = torch.randn(3, 50)
    greedy = RowSampler(0.0, 1.0, 0, None, torch.device("cpu"))
    top1 = RowSampler(1.0, 1.0, 1, 5, torch.device("cpu"))
    tiny_p = RowSampler(1.0, 1e-6, 0, 5, torch.device("cpu"))
    got = sample(logits.clone(), [greedy, top1, tiny_p])
    assert got.tolist() == logits.argmax(-1).tolist()
    kept = torch.isfinite(filter_logits(logits[0], 1.0, 1.0, 10)).sum()
    assert kept == 10
    a = [sample(logits.clone(), [RowSampler(1.0, 0.9, 0, 42, torch.device("cpu"))] * 3).tolist() for _ in range(2)]
    assert a[0] == a[1]
