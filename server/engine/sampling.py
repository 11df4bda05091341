"""Next-token choice for a batch whose rows carry their own sampling settings."""

from __future__ import annotations

import torch


class RowSampler:
    """One row's settings and RNG: a seed makes the row reproducible whatever else is in the batch."""

    def __init__(self, temperature: float, top_p: float, top_k: int, seed: int | None, device: torch.device):
        self.temperature = temperature
        self.top_p = top_p
        self.top_k = top_k
        self.greedy = temperature == 0.0
        self.generator = None
        if not self.greedy:
            self.generator = torch.Generator(device=device)
            if seed is None:
                self.generator.seed()
            else:
                self.generator.manual_seed(seed)


def filter_logits(logits: torch.Tensor, temperature: float, top_p: float, top_k: int) -> torch.Tensor:
    """Temperature, top-k and top-p (nucleus) applied to one row's logits [V]."""
    logits = logits.float() / temperature
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        # Drop a token when the ones before it already reach top_p; the first token always stays.
        drop = (cum - sorted_logits.softmax(-1)) >= top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    return logits


def sample(logits: torch.Tensor, samplers: list[RowSampler]) -> torch.Tensor:
    """logits [B, V] -> token ids [B] (on the logits' device)."""
    tokens = logits.argmax(dim=-1)  # [B]; greedy rows are done
    for i, s in enumerate(samplers):
        if s.greedy:
            continue
        probs = filter_logits(logits[i], s.temperature, s.top_p, s.top_k).softmax(-1)
        tokens[i] = torch.multinomial(probs, 1, generator=s.generator)[0]
    return tokens
