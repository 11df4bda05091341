"""Next-token choice for all rows at once, from per-row tensors: no Python loop over rows, no host sync.

Each row has its own temperature, top-k, top-p and seed. A sampled token is drawn by inverse-CDF
sampling with one uniform number per row, made by a counter-based hash of (seed, tokens generated so
far): a seeded row gives the same tokens whatever else is in the batch, and nothing here keeps RNG
state, so the whole function can sit inside a captured CUDA graph. The distribution is the one
multinomial sampling of the filtered softmax gives.

Numerically safe for every value the API accepts: logits are shifted so their maximum is 0 before
the temperature divides them, so a tiny temperature sends the others to -inf (a one-hot softmax)
instead of overflowing to inf - inf = NaN.
"""

from __future__ import annotations

import secrets

import torch

# splitmix64 constants, as signed int64 (torch has no uint64 arithmetic).
_GAMMA = 0x9E3779B97F4A7C15 - (1 << 64)
_MIX1 = 0xBF58476D1CE4E5B9 - (1 << 64)
_MIX2 = 0x94D049BB133111EB - (1 << 64)


def _shr(z: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic)."""
    return (z >> s) & ((1 << (64 - s)) - 1)


def uniform(seed: torch.Tensor, counter: torch.Tensor) -> torch.Tensor:
    """splitmix64 output number `counter` of the stream `seed` -> float32 in (0, 1). [N] int64 -> [N]."""
    z = seed + counter * _GAMMA + _GAMMA
    z = (z ^ _shr(z, 30)) * _MIX1
    z = (z ^ _shr(z, 27)) * _MIX2
    z = z ^ _shr(z, 31)
    return (_shr(z, 40).float() + 0.5) * (1.0 / (1 << 24))


def sample(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
           seed: torch.Tensor, counter: torch.Tensor, filtered: bool) -> torch.Tensor:
    """logits [N, V] -> tokens [N] (int64). temperature 0 means greedy; top_k 0 and top_p 1 mean no cut.

    `filtered` is False when no row uses top-k or top-p: the full-vocabulary sort is skipped then.
    """
    logits = logits.float()
    greedy = temperature <= 0
    t = torch.where(greedy, torch.ones_like(temperature), temperature)
    x = (logits - logits.max(dim=-1, keepdim=True).values) / t[:, None]  # [N, V], max 0
    if filtered:
        x = _filter(x, top_k, top_p)
    probs = x.softmax(dim=-1)
    cdf = probs.cumsum(dim=-1)  # [N, V]
    u = uniform(seed, counter) * cdf[:, -1]
    vocab = logits.shape[-1]
    drawn = torch.searchsorted(cdf, u[:, None], right=True)[:, 0].clamp_(max=vocab - 1)
    return torch.where(greedy, logits.argmax(dim=-1), drawn)


def sample_rows(logits: torch.Tensor, rows) -> torch.Tensor:
    """sample() for engine rows, settings read from each row: logits [N, V] -> tokens [N].

    The counter is the row's tokens generated so far, so a row draws the same stream whichever
    engine (or step) samples it."""
    dev = logits.device
    sp = [r.request.sampling for r in rows]
    return sample(logits, torch.tensor([s.temperature for s in sp], dtype=torch.float32, device=dev),
                  torch.tensor([s.top_k for s in sp], device=dev),
                  torch.tensor([s.top_p for s in sp], dtype=torch.float32, device=dev),
                  torch.tensor([r.seed for r in rows], device=dev), torch.tensor([r.generated for r in rows], device=dev),
                  filtered=any(s.filters for s in sp))


def _filter(x: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Keep each row's top_k values and its smallest set of values whose probability reaches top_p."""
    vocab = x.shape[-1]
    ordered = x.sort(dim=-1, descending=True).values  # [N, V]
    k = torch.where(top_k > 0, top_k, torch.full_like(top_k, vocab)).clamp(max=vocab)
    kth = ordered.gather(1, (k - 1)[:, None])  # [N, 1]
    p = ordered.softmax(dim=-1)
    # A value stays when the ones before it do not reach top_p yet; the first always stays.
    kept = ((p.cumsum(dim=-1) - p) < top_p[:, None]).sum(dim=-1, keepdim=True).clamp(min=1)
    pth = ordered.gather(1, kept - 1)
    return x.masked_fill(x < torch.maximum(kth, pth), float("-inf"))


def new_seed() -> int:
    """A seed for a row that gave none (its draws are then not reproducible, as the API says)."""
    return secrets.randbits(62)
