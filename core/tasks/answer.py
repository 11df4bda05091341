"""Extractive question answering: context windows, answer spans in tokens, and the best span.

A context longer than the model's budget is read in overlapping windows (Transformers' doc_stride
scheme), so an answer cut by one window's edge is whole in the next. Training labels an answer by
the tokens covering its characters; inference picks, per window, the start/end token pair with the
highest start + end logit inside the context, and the windows compete by score.
"""

from __future__ import annotations

import torch
from loraserve.core.errors import InvalidArgument


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidArgument(f"{name} must be a positive integer, got {value!r}")
    return value


def best_span(start_logits: torch.Tensor, end_logits: torch.Tensor, context_mask: torch.Tensor,
              max_answer_tokens: int) -> tuple[int, int, float] | None:
    """The (start, end, score) token span of one window maximising start_logits[start] +
    end_logits[end], over start <= end < start + max_answer_tokens with both tokens in the context
    (context_mask True); None when the window has no context token.

    score = p_start[start] * p_end[end], where p_start = softmax of start_logits over the context
    tokens only (the others are excluded, not zeroed) and likewise p_end: a probability in [0, 1]
    that windows of different lengths can be compared by. It ranks spans exactly like the logit
    sum (log p = logit - a per-window constant). Ties go to the smallest start, then smallest end.
    All pairs are scored at once under a band mask (upper triangle of width max_answer_tokens):
    windows are a few hundred tokens, so the n x n matrix is small. Runs on the logits' device."""
    spans = top_spans(start_logits, end_logits, context_mask, max_answer_tokens, 1)
    return spans[0] if spans else None


def top_spans(start_logits: torch.Tensor, end_logits: torch.Tensor, context_mask: torch.Tensor,
              max_answer_tokens: int, k: int) -> list[tuple[int, int, float]]:
    """The k best valid spans of one window, best first, ranked and scored as best_span does."""
    max_answer_tokens = _positive_int("max_answer_tokens", max_answer_tokens)
    k = _positive_int("k", k)
    if not (start_logits.dim() == end_logits.dim() == context_mask.dim() == 1
            and start_logits.shape == end_logits.shape == context_mask.shape):
        raise InvalidArgument("start_logits, end_logits and context_mask must be 1-D and of one "
                              f"length, got {tuple(start_logits.shape)}, {tuple(end_logits.shape)}"
                              f" and {tuple(context_mask.shape)}")
    mask = context_mask.to(device=start_logits.device, dtype=torch.bool)
    if not bool(mask.any()):
        return []
    start, end = start_logits.float(), end_logits.float()
    neg_inf = torch.tensor(float("-inf"), device=start.device)
    n = start.shape[0]
    ones = torch.ones(n, n, dtype=torch.bool, device=start.device)
    band = torch.triu(ones) & torch.tril(ones, diagonal=max_answer_tokens - 1)
    valid = band & mask[:, None] & mask[None, :]
    pair = torch.where(valid, start[:, None] + end[None, :], neg_inf).view(-1)
    # A stable descending sort: among equal sums the first in row-major order (smallest start, then end).
    order = torch.sort(pair, descending=True, stable=True).indices[:k].tolist()
    log_p_start = torch.where(mask, start, neg_inf).log_softmax(-1)
    log_p_end = torch.where(mask, end, neg_inf).log_softmax(-1)
    out = []
    for flat in order:
        if not bool(torch.isfinite(pair[flat])):
            break
        i, j = flat // n, flat % n
        out.append((i, j, float((log_p_start[i] + log_p_end[j]).exp())))
    return out


def windows(context_ids_len: int, max_context_tokens: int, stride: int) -> list[tuple[int, int]]:
    """(start, end) token ranges, end exclusive, covering a context of context_ids_len tokens:
    windows of max_context_tokens, each starting stride tokens before the previous one ended (as
    Transformers' doc_stride: consecutive windows share stride tokens); the last may be shorter.
    An empty context has no window."""
    max_context_tokens = _positive_int("max_context_tokens", max_context_tokens)
    if isinstance(stride, bool) or not isinstance(stride, int) or not 0 <= stride < max_context_tokens:
        raise InvalidArgument(f"stride must be an integer in [0, max_context_tokens="
                              f"{max_context_tokens}), got {stride!r}")
    if isinstance(context_ids_len, bool) or not isinstance(context_ids_len, int) or context_ids_len < 0:
        raise InvalidArgument(f"context length must be a non-negative integer, got {context_ids_len!r}")
    spans, start = [], 0
    while start < context_ids_len:
        end = min(start + max_context_tokens, context_ids_len)
        spans.append((start, end))
        if end == context_ids_len:
            break
        start = end - stride
    return spans


def answer_to_token_span(offsets: list[tuple[int, int] | None], answer_start: int,
                         answer_text_len: int) -> tuple[int, int] | None:
    """(first, last) indices into offsets (inclusive) of the tokens covering characters
    [answer_start, answer_start + answer_text_len), or None when the window does not hold the
    whole answer (the window is then trained to point at no span). offsets are the window's
    tokens' character offsets into the context; an entry that is None or empty ((0, 0): a special
    or question token) is not context and never part of a span."""
    if isinstance(answer_start, bool) or not isinstance(answer_start, int) or answer_start < 0:
        raise InvalidArgument(f"answer_start must be a non-negative integer, got {answer_start!r}")
    _positive_int("answer length", answer_text_len)
    answer_end = answer_start + answer_text_len
    context = [(i, o[0], o[1]) for i, o in enumerate(offsets) if o is not None and o[0] < o[1]]
    if not context or context[0][1] > answer_start or max(e for _, _, e in context) < answer_end:
        return None
    first = next(i for i, _s, e in context if e > answer_start)
    last = max(i for i, s, _e in context if s < answer_end)
    return first, last


def check_answer(context: str, answer_text: str, answer_start: int) -> None:
    """InvalidArgument unless answer_text is at answer_start in context: a wrong offset would train
    the model on a span the client did not mean. The message says where the text does occur."""
    if not isinstance(context, str) or not isinstance(answer_text, str):
        raise InvalidArgument("context and answer text must be strings")
    if not answer_text:
        raise InvalidArgument("the answer text is empty")
    if isinstance(answer_start, bool) or not isinstance(answer_start, int):
        raise InvalidArgument(f"answer_start must be an integer, got {answer_start!r}")
    if answer_start >= 0 and context[answer_start:answer_start + len(answer_text)] == answer_text:
        return
    shown = answer_text if len(answer_text) <= 40 else answer_text[:37] + "..."
    found = _occurrences(context, answer_text, limit=4)
    more = " and later" if len(found) == 4 else ""
    where = (f"; it occurs at {', '.join(map(str, found[:3]))}{more}" if found
             else "; it does not occur in the context at all")
    raise InvalidArgument(f"the answer '{shown}' is not found at answer_start {answer_start} of its "
                          f"context{where}")


def _occurrences(text: str, piece: str, limit: int) -> list[int]:
    """Start offsets of the first `limit` (possibly overlapping) occurrences of piece in text."""
    found: list[int] = []
    at = text.find(piece)
    while at >= 0 and len(found) < limit:
        found.append(at)
        at = text.find(piece, at + 1)
    return found


def char_span(context: str, offsets: list[tuple[int, int] | None], start: int, end: int) -> tuple[int, int]:
    """The characters of the token span [start, end] in the context, without the whitespace a byte-level
    BPE token carries before its word (" Smith" -> "Smith"): what a reader calls the answer."""
    first, last = offsets[start][0], offsets[end][1]
    piece = context[first:last]
    stripped = piece.strip()
    if not stripped:
        return first, last
    first += len(piece) - len(piece.lstrip())
    return first, first + len(stripped)
