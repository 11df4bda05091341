"""Incremental detokenization, stop sequences and per-row sampling."""

from __future__ import annotations

import torch
from loraserve.server.engine.detokenize import TextStream
from loraserve.server.engine.sampling import sample
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


def _sample(logits, temperature, top_k=0, top_p=1.0, seed=0, counter=0):
    n = logits.shape[0]

    def col(v, dtype):
        return torch.as_tensor(v if isinstance(v, list) else [v] * n, dtype=dtype)

    tk, tp = col(top_k, torch.long), col(top_p, torch.float32)
    return sample(logits, col(temperature, torch.float32), tk, tp, col(seed, torch.long), col(counter, torch.long),
                  filtered=bool((tk > 0).any() or (tp < 1).any()))


def test_greedy_and_degenerate_cuts_pick_the_argmax():
    torch.manual_seed(0)
    logits = torch.randn(4, 50)
    best = logits.argmax(-1).tolist()
    assert _sample(logits, [0.0, 1.0, 1.0, 1e-37], top_k=[0, 1, 0, 0], top_p=[1.0, 1.0, 1e-6, 1.0]).tolist() == best


def test_tiny_temperature_and_extreme_logits_stay_finite():
    # 1e-37 overflowed the old sampler (logits / T = inf, inf - inf = NaN) and failed every row of the step.
    logits = torch.tensor([[3e38, -3e38, 0.0], [0.0, 0.0, 1.0]])
    got = _sample(logits, [1e-37, 1e-37], top_p=[0.5, 1.0])
    assert got.tolist() == [0, 2]


def test_top_k_and_top_p_keep_only_their_tokens():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]]).repeat(200, 1)
    k2 = _sample(logits, 1.0, top_k=2, counter=list(range(200)))
    assert set(k2.tolist()) == {0, 1}
    # softmax of [4,3,2,1,0] is [.64,.24,.09,.03,.01]: top_p 0.8 keeps the first two, 0.9 the first three
    p8 = _sample(logits, 1.0, top_p=0.8, counter=list(range(200)))
    p9 = _sample(logits, 1.0, top_p=0.9, counter=list(range(200)))
    assert set(p8.tolist()) == {0, 1} and set(p9.tolist()) == {0, 1, 2}


def test_seeded_rows_repeat_whatever_the_batch():
    torch.manual_seed(1)
    logits = torch.randn(1, 1000)
    alone = [_sample(logits, 1.0, seed=42, counter=c).item() for c in range(20)]
    batch = torch.cat([torch.randn(3, 1000), logits])
    mixed = [_sample(batch, 1.0, seed=[7, 8, 9, 42], counter=c)[3].item() for c in range(20)]
    assert alone == mixed
    assert alone != [_sample(logits, 1.0, seed=43, counter=c).item() for c in range(20)]


def test_draws_follow_the_softmax():
    # 20,000 draws of one row over 5 tokens: every frequency within 5 standard errors of its probability.
    logits = torch.tensor([[1.0, 0.5, 0.0, -1.0, -3.0]])
    n = 20_000
    draws = _sample(logits.repeat(n, 1), 0.7, seed=list(range(n)), counter=0)
    freq = torch.bincount(draws, minlength=5).float() / n
    p = (logits / 0.7).softmax(-1)[0]
    assert torch.all((freq - p).abs() <= 5 * (p * (1 - p) / n).sqrt() + 1e-4), (freq, p)
