"""LoRA kernels for the static-shape engine: shrink (h = x A^T) and expand (y += h B^T), many slots at once.

Data layout (core/lora/layer.py): a targeted Linear holds ``lora_a [S, R, in]`` and ``lora_b [S, out, R]``
(S = slots + 1, R = max rank, scaling folded into B, slot 0 all zeros = "no adapter"). An adapter of
rank r < R fills rows/cols [:r]; the rest are zeros. Projections sharing an input are fused: q/k/v
share one A buffer ``[S, 3R, in]`` (gate/up ``[S, 2R, in]``), projection g's A being rows
[g*R, (g+1)*R); each projection keeps its own B.

One forward step (every layer, every projection) uses the same per-token slot vector ``idx [T]``:

    meta = lora_meta(idx, S)                          # once per step: tokens grouped by slot
    h = lora_shrink(x, a_qkv, idx, ranks, 3, meta=meta)        # [T, 3R] (fp32 by default)
    lora_expand(y_q, h, b_q, idx, ranks, 0, meta=meta)         # y_q += h[:, 0:r] @ B_q[slot]^T
    lora_expand(y_k, h, b_k, idx, ranks, 1, meta=meta)         # ... group 1, group 2

Contract
--------
* ``h[t, g*R + j]`` is defined only for ``idx[t] != 0`` and ``j < rank(g, idx[t])``; every other
  entry of h is unspecified (the fast shrink does not write it; ``lora_expand`` never reads it).
* ``lora_expand`` writes only rows with ``idx != 0`` and rank > 0; other rows of y are untouched
  (bit for bit). Each written row gets one rounding: ``y = (float(y) + delta_fp32).to(y.dtype)``.
* Precision: products are accumulated in fp32. x is cast to A's dtype before the product (as
  ``x.to(a.dtype) @ a.T`` would), h is cast to B's dtype before the second product (so with bf16
  weights h is rounded to bf16 there, as a plain bf16 torch implementation would). With fp32
  weights the GPU product uses true fp32 ("ieee"), not TF32.
* ``ranks`` is ``[S]`` (one rank per slot, used for every group) or ``[G, S]`` (per projection; 0 =
  that adapter does not target that projection, which then costs nothing). Values are clamped to R.
  ``idx`` values must lie in [0, S); anything else is undefined behaviour (no check: a check would
  need a host sync).
* Strides: any strides are accepted for x, a, b, h and y (they are passed to the kernel), but the
  last dimension should have stride 1 for coalesced loads. ``a`` may be a view of one projection's
  R-row block inside the fused buffer (``buf[:, g*R:(g+1)*R]`` with ``n_groups=1``), or the whole
  contiguous fused buffer ``[S, G*R, in]`` with ``n_groups=G``.
* CUDA graphs: nothing here syncs with the host or allocates a size that depends on tensor values
  (sizes depend on T, S, R only; ``out=`` / ``meta=`` may be preallocated/prebuilt). Triton compiles
  a kernel on its first launch per (dtypes, block config, stride pattern): run each shape class once
  before capturing.

Kernel design (server/lora/triton_ops.py)
-----------------------------------------
Both kernels are "grouped GEMM by slot" (Punica's SGMV idea, which also covers BGMV decode):

1. ``lora_meta`` sorts the token indices by slot (stable ``torch.sort``) and finds each slot's
   segment with ``torch.searchsorted(sorted_idx, arange(S + 1))``: ``order [T]`` and
   ``seg_start [S + 1]``; slot s's tokens are ``order[seg_start[s]:seg_start[s+1]]``. Three small
   device ops, no sync, computed once per step and shared by every layer. Prefill segments stay in
   order (stable sort), so their gathered rows are contiguous in memory.
2. Axis 0 of the grid enumerates *tiles*: BLOCK_M tokens of one slot. Slot 0 gets no tiles (rows
   without an adapter cost nothing but their share of the sort). The tile -> (slot, block) map is
   computed inside each program from seg_start: a cumsum over the per-slot tile counts
   (a vector of next_pow2(S) ints, negligible) and a count of the cumsum entries <= tile id. The
   grid is a value-independent upper bound, ``min(T, cdiv(T, BLOCK_M) + S - 1)`` (each non-empty
   slot wastes at most one partial tile); programs past the real tile count exit at once.
   Tokens sharing an adapter therefore read that adapter's weights once per tile, not once per
   token (the BGMV weakness when a decode batch has many rows on one adapter), and a decode batch
   with every row on its own adapter is one tile per slot.
3. shrink, grid ``(tiles, cdiv(R, BLOCK_N), G)``: a program computes h for its BLOCK_M tokens x
   BLOCK_N rank columns of group g, looping over ``in`` in BLOCK_K=128 steps (x rows gathered via
   ``order``; x cast to A's dtype; ``tl.dot`` with fp32 accumulator). Programs whose column block
   starts at or past the slot's rank exit immediately, and A rows >= rank are masked (never
   loaded), so the cost follows the real rank, not R. BLOCK_N = 16 for R <= 16, else 32.
   BLOCK_K = 64 for fp32 weights (same bytes per tile; shared memory stays under 64 KiB).
   Each group re-reads its x tile (from L2): x is read G times per tile, A once.
4. expand, grid ``(tiles, cdiv(out, BLOCK_N=128))``: a program computes a BLOCK_M x 128 block of the
   delta, looping over the rank in BLOCK_K=16 steps *only up to the slot's rank* (a dynamic loop
   bound loaded from ``ranks``), then adds it to y in fp32 and stores once. Each (token, output)
   element belongs to exactly one program: no atomics, deterministic results, and a token's
   result does not depend on which other tokens share the batch (for a given T).
5. BLOCK_M = 16 (the smallest ``tl.dot`` M) when T <= 256 (decode: few tokens per slot, padding rows
   are cheap, more tiles in flight), 64 for larger T (prefill: A/B tiles reused by 64 tokens).
   All three dot dimensions are >= 16, as ``tl.dot`` requires. 4 warps everywhere.

Not done (possible later): split-K for shrink at tiny T (it needs a zeroed fp32 h and atomics, which
would lose determinism); autotuning the block sizes on real hardware.

On CPU tensors the same kernels run in Triton's interpreter (tests only: it is very slow). No
``TRITON_INTERPRET`` variable is needed: the launcher wraps the kernel source in the interpreter for
CPU tensors, which works even though bitsandbytes imports triton (in compiled mode) first. For that
the kernels avoid triton.language.standard's @jit helpers (tl.sum, tl.cumsum, tl.zeros), and two
interpreter defects are worked around under constexpr flags that are False on the GPU: its bf16
``tl.dot`` multiplies raw bit patterns (the interpreter dots fp32 copies of the tiles instead: same
result, bf16 x bf16 products are exact in fp32), and its fp32 -> bf16 cast truncates (the
interpreter rounds to nearest even by hand first, as the GPU's cast does).
Without triton installed this module still imports; the fast functions then raise RuntimeError.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

__all__ = [
    "LoraMeta",
    "lora_expand",
    "lora_expand_reference",
    "lora_meta",
    "lora_shrink",
    "lora_shrink_reference",
    "triton_available",
]


@functools.cache
def triton_available() -> bool:
    """Whether the fast (Triton) kernels can be used at all (triton importable)."""
    try:
        import triton.language  # noqa: F401
    except Exception:  # noqa: BLE001 - ImportError, or a broken install (a missing CUDA library, say)
        return False
    return True


def _triton_ops():
    if not triton_available():
        raise RuntimeError("the fast LoRA kernels need triton (pip install triton); "
                           "use lora_shrink_reference / lora_expand_reference instead")
    from loraserve.server.lora import triton_ops

    return triton_ops


@dataclass(frozen=True)
class LoraMeta:
    """Tokens grouped by slot, built on the device by ``lora_meta`` (once per step).

    order: [T] int64, token indices sorted by slot (stable: a slot's tokens keep their order).
    seg_start: [S + 1] int64, slot s's tokens are ``order[seg_start[s]:seg_start[s + 1]]``.
    """

    order: torch.Tensor
    seg_start: torch.Tensor
    num_slots: int


def lora_meta(idx: torch.Tensor, num_slots: int) -> LoraMeta:
    """Group the tokens of ``idx`` ([T] int32/int64 slot per token) by slot; no host sync."""
    if idx.dim() != 1:
        raise ValueError(f"idx must be 1-D [T], got shape {tuple(idx.shape)}")
    sorted_idx, order = torch.sort(idx, stable=True)
    bounds = torch.arange(num_slots + 1, dtype=idx.dtype, device=idx.device)
    seg_start = torch.searchsorted(sorted_idx, bounds)
    return LoraMeta(order=order, seg_start=seg_start, num_slots=num_slots)


def _check_ranks(ranks: torch.Tensor, num_slots: int, n_groups: int) -> None:
    if ranks.dim() == 1:
        ok = ranks.shape[0] == num_slots
    else:
        ok = ranks.dim() == 2 and ranks.shape[1] == num_slots and ranks.shape[0] >= n_groups
    if not ok:
        raise ValueError(f"ranks must be [S] or [G, S] with S={num_slots}, G>={n_groups}; got {tuple(ranks.shape)}")


def _rank_of(ranks: torch.Tensor, group: int, slot: int, max_rank: int) -> int:
    r = ranks[group, slot] if ranks.dim() == 2 else ranks[slot]
    return min(int(r), max_rank)


# --- reference (plain torch, one matmul per slot present: obviously correct, slow, syncs) ---------


def lora_shrink_reference(x: torch.Tensor, a: torch.Tensor, idx: torch.Tensor, ranks: torch.Tensor,
                          n_groups: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """h[t, g*R + j] = sum_k x[t, k] a[idx[t], g*R + j, k] for j < rank; other entries left as they are.

    ``out`` defaults to a zeroed fp32 [T, G*R] buffer. Products in fp32 after casting x to a.dtype.
    Loops over the slots present (one matmul per slot and group); syncs with the host.
    """
    T = x.shape[0]
    S, GR, _ = a.shape
    R = GR // n_groups
    _check_ranks(ranks, S, n_groups)
    h = out if out is not None else torch.zeros(T, GR, dtype=torch.float32, device=x.device)
    for s in idx.unique().tolist():
        if s == 0:
            continue
        rows = (idx == s).nonzero().squeeze(1)
        xs = x[rows].to(a.dtype).float()
        for g in range(n_groups):
            r = _rank_of(ranks, g, s, R)
            if r:
                h[rows, g * R:g * R + r] = (xs @ a[s, g * R:g * R + r].float().T).to(h.dtype)
    return h


def lora_expand_reference(y: torch.Tensor, h: torch.Tensor, b: torch.Tensor, idx: torch.Tensor,
                          ranks: torch.Tensor, group: int) -> torch.Tensor:
    """y[t] += h[t, g*R : g*R + r] @ b[idx[t], :, :r]^T in place for idx[t] != 0; returns y.

    h is cast to b.dtype first, the product is fp32, and y is rounded once: (y + delta).to(y.dtype).
    Loops over the slots present; syncs with the host.
    """
    S, _, R = b.shape
    _check_ranks(ranks, S, group + 1)
    for s in idx.unique().tolist():
        if s == 0:
            continue
        r = _rank_of(ranks, group, s, R)
        if r == 0:
            continue
        rows = (idx == s).nonzero().squeeze(1)
        hs = h[rows, group * R:group * R + r].to(b.dtype).float()
        delta = hs @ b[s, :, :r].float().T
        y[rows] = (y[rows].float() + delta).to(y.dtype)
    return y


# --- fast (Triton) ----------------------------------------------------------------------------------


def lora_shrink(x: torch.Tensor, a: torch.Tensor, idx: torch.Tensor, ranks: torch.Tensor, n_groups: int,
                *, out: torch.Tensor | None = None, meta: LoraMeta | None = None) -> torch.Tensor:
    """Fast ``lora_shrink_reference``: x [T, in], a [S, G*R, in] -> h [T, G*R] (fp32 unless ``out``).

    Only h[t, g*R + j] with idx[t] != 0 and j < rank is written (see the module docstring).
    ``meta`` = ``lora_meta(idx, S)``, built here when not given (pass it: it is shared per step).
    """
    T, K = x.shape
    S, GR, Ka = a.shape
    if Ka != K:
        raise ValueError(f"x has {K} features but a has {Ka}")
    if n_groups < 1 or GR % n_groups:
        raise ValueError(f"a's second dimension {GR} is not a multiple of n_groups={n_groups}")
    if idx.shape != (T,):
        raise ValueError(f"idx must be [T]={T}, got {tuple(idx.shape)}")
    _check_ranks(ranks, S, n_groups)
    if out is None:
        out = torch.empty(T, GR, dtype=torch.float32, device=x.device)
    elif out.shape != (T, GR):
        raise ValueError(f"out must be [{T}, {GR}], got {tuple(out.shape)}")
    if T == 0:
        return out
    ops = _triton_ops()
    if meta is None:
        meta = lora_meta(idx, S)
    ops.shrink(x, a, out, meta.order, meta.seg_start, ranks, S, n_groups)
    return out


def lora_expand(y: torch.Tensor, h: torch.Tensor, b: torch.Tensor, idx: torch.Tensor, ranks: torch.Tensor,
                group: int, *, meta: LoraMeta | None = None) -> torch.Tensor:
    """Fast ``lora_expand_reference``: y [T, out] += h[:, g*R : g*R+r] @ b[idx]^T in place; returns y.

    b is [S, out, R]; h is [T, G*R] with G > group (only its valid entries are read).
    """
    T, N = y.shape
    S, Nb, R = b.shape
    if Nb != N:
        raise ValueError(f"y has {N} features but b has {Nb}")
    if h.dim() != 2 or h.shape[0] != T or h.shape[1] < (group + 1) * R:
        raise ValueError(f"h must be [T={T}, >= {(group + 1) * R}] for group {group}, got {tuple(h.shape)}")
    if idx.shape != (T,):
        raise ValueError(f"idx must be [T]={T}, got {tuple(idx.shape)}")
    _check_ranks(ranks, S, group + 1)
    if T == 0:
        return y
    ops = _triton_ops()
    if meta is None:
        meta = lora_meta(idx, S)
    ops.expand(y, h, b, meta.order, meta.seg_start, ranks, S, group)
    return y
