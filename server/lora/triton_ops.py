"""Triton kernels behind server/lora/ops.py (read its docstring for the design and the contract).

Imported only when triton is installed. CUDA tensors run the compiled kernels; CPU tensors run the
same kernel source in Triton's interpreter (for tests), whether or not TRITON_INTERPRET is set.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

BLOCK_K_SHRINK = 128  # over `in` (64 for fp32 weights: same bytes per tile, shared memory < 64 KiB at BLOCK_M=64)
BLOCK_K_EXPAND = 16  # over the rank: the loop stops at the slot's real rank with this granularity
BLOCK_N_EXPAND = 128  # over `out`
SMALL_T = 256  # T at or below this counts as decode-like: BLOCK_M = 16, else 64
NUM_WARPS = 4

# The kernels use only triton.language builtins plus the combine function below, never the
# @jit-decorated helpers of triton.language.standard (tl.sum, tl.cumsum, tl.zeros, tl.cdiv): those
# are compiled-mode functions unless TRITON_INTERPRET=1 was set before triton was first imported
# (bitsandbytes imports it early), and the interpreter cannot call them.


@triton.jit
def _add_combine(a, b):
    return a + b


# The same function under the name the interpreter recognises (it then uses numpy's sum/cumsum
# instead of a Python loop per element); ours where a triton version lacks it.
_add = getattr(tl.standard, "_sum_combine", _add_combine)


@triton.jit
def _shrink_kernel(
    x_ptr, a_ptr, h_ptr, order_ptr, seg_ptr, ranks_ptr,
    K, R, num_slots,
    sx_t, sx_k, sa_s, sa_r, sa_k, sh_t, sh_c, sr_g, sr_s,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, S_PAD: tl.constexpr,
    DOT_F32: tl.constexpr, RNE_X: tl.constexpr, RNE_H: tl.constexpr,
):
    tile = tl.program_id(0)
    pid_n = tl.program_id(1)
    g = tl.program_id(2)

    # tile -> (slot, block of that slot's tokens); slot 0 gets no tiles
    s_ar = tl.arange(0, S_PAD)
    live = (s_ar >= 1) & (s_ar < num_slots)
    lo = tl.load(seg_ptr + s_ar, mask=live, other=0).to(tl.int32)
    hi = tl.load(seg_ptr + s_ar + 1, mask=live, other=0).to(tl.int32)
    ntiles = (hi - lo + BLOCK_M - 1) // BLOCK_M
    cum = tl.associative_scan(ntiles, 0, _add)  # inclusive cumsum
    slot = tl.reduce((cum <= tile).to(tl.int32), 0, _add)
    if slot >= num_slots:
        return  # past the last real tile
    here = s_ar == slot
    first_tile = tl.reduce(tl.where(here, cum - ntiles, 0), 0, _add)
    start = tl.reduce(tl.where(here, lo, 0), 0, _add)
    count = tl.reduce(tl.where(here, hi - lo, 0), 0, _add)

    rank = tl.minimum(tl.load(ranks_ptr + g * sr_g + slot * sr_s).to(tl.int32), R)
    n0 = pid_n * BLOCK_N
    if n0 >= rank:
        return  # this column block is past the adapter's rank

    offs_m = (tile - first_tile) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = offs_m < count
    tok = tl.load(order_ptr + start + offs_m, mask=row_ok, other=0).to(tl.int64)
    offs_n = n0 + tl.arange(0, BLOCK_N)
    col_ok = offs_n < rank
    offs_k = tl.arange(0, BLOCK_K)

    x_ptrs = x_ptr + tok[:, None] * sx_t + offs_k[None, :] * sx_k  # [BM, BK]
    a_ptrs = (a_ptr + slot.to(tl.int64) * sa_s + (g * R + offs_n)[None, :].to(tl.int64) * sa_r
              + offs_k[:, None] * sa_k)  # [BK, BN]
    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = (k0 + offs_k) < K
        xt = tl.load(x_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        if RNE_X:  # interpreter only: round fp32 to bf16 by hand, the cast below is then exact
            bits = xt.to(tl.uint32, bitcast=True)
            xt = ((bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000).to(tl.float32, bitcast=True)
        xt = xt.to(a_ptr.dtype.element_ty)
        at = tl.load(a_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        if DOT_F32:  # fp32 weights (true fp32, not TF32), or the interpreter (its bf16 dot is broken)
            acc = tl.dot(xt.to(tl.float32), at.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(xt, at, acc)
        x_ptrs += BLOCK_K * sx_k
        a_ptrs += BLOCK_K * sa_k

    if RNE_H:  # interpreter only (see RNE_X)
        bits = acc.to(tl.uint32, bitcast=True)
        acc = ((bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000).to(tl.float32, bitcast=True)
    h_ptrs = h_ptr + tok[:, None] * sh_t + (g * R + offs_n)[None, :] * sh_c
    tl.store(h_ptrs, acc.to(h_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _expand_kernel(
    y_ptr, h_ptr, b_ptr, order_ptr, seg_ptr, ranks_ptr,
    N, R, num_slots, group,
    sy_t, sy_n, sh_t, sh_c, sb_s, sb_n, sb_r, sr_g, sr_s,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, S_PAD: tl.constexpr,
    DOT_F32: tl.constexpr, RNE_H: tl.constexpr, RNE_Y: tl.constexpr,
):
    tile = tl.program_id(0)
    pid_n = tl.program_id(1)

    # tile -> (slot, block of that slot's tokens): same mapping as the shrink kernel
    s_ar = tl.arange(0, S_PAD)
    live = (s_ar >= 1) & (s_ar < num_slots)
    lo = tl.load(seg_ptr + s_ar, mask=live, other=0).to(tl.int32)
    hi = tl.load(seg_ptr + s_ar + 1, mask=live, other=0).to(tl.int32)
    ntiles = (hi - lo + BLOCK_M - 1) // BLOCK_M
    cum = tl.associative_scan(ntiles, 0, _add)
    slot = tl.reduce((cum <= tile).to(tl.int32), 0, _add)
    if slot >= num_slots:
        return
    here = s_ar == slot
    first_tile = tl.reduce(tl.where(here, cum - ntiles, 0), 0, _add)
    start = tl.reduce(tl.where(here, lo, 0), 0, _add)
    count = tl.reduce(tl.where(here, hi - lo, 0), 0, _add)

    rank = tl.minimum(tl.load(ranks_ptr + group * sr_g + slot * sr_s).to(tl.int32), R)
    if rank <= 0:
        return  # this adapter does not target this projection

    offs_m = (tile - first_tile) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = offs_m < count
    tok = tl.load(order_ptr + start + offs_m, mask=row_ok, other=0).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)

    h_ptrs = h_ptr + tok[:, None] * sh_t + (group * R + offs_k)[None, :] * sh_c  # [BM, BK]
    b_ptrs = b_ptr + slot.to(tl.int64) * sb_s + offs_n[None, :].to(tl.int64) * sb_n + offs_k[:, None] * sb_r  # [BK, BN]
    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    for k0 in range(0, rank, BLOCK_K):  # only up to the real rank
        k_ok = (k0 + offs_k) < rank
        ht = tl.load(h_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        if RNE_H:  # interpreter only (see the shrink kernel)
            bits = ht.to(tl.uint32, bitcast=True)
            ht = ((bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000).to(tl.float32, bitcast=True)
        ht = ht.to(b_ptr.dtype.element_ty)
        bt = tl.load(b_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        if DOT_F32:  # fp32 weights (true fp32, not TF32), or the interpreter (its bf16 dot is broken)
            acc = tl.dot(ht.to(tl.float32), bt.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(ht, bt, acc)
        h_ptrs += BLOCK_K * sh_c
        b_ptrs += BLOCK_K * sb_r

    y_ptrs = y_ptr + tok[:, None] * sy_t + offs_n[None, :] * sy_n
    mask = row_ok[:, None] & n_ok[None, :]
    out = tl.load(y_ptrs, mask=mask, other=0.0).to(tl.float32) + acc
    if RNE_Y:  # interpreter only (see the shrink kernel)
        bits = out.to(tl.uint32, bitcast=True)
        out = ((bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000).to(tl.float32, bitcast=True)
    tl.store(y_ptrs, out.to(y_ptr.dtype.element_ty), mask=mask)


@functools.cache
def _interpreted(kernel):
    return InterpretedFunction(kernel.fn)


def _for_device(kernel, device: torch.device):
    """(kernel, interpreted): the compiled kernel for GPU tensors, the interpreter for CPU tensors (tests).

    Under the interpreter the dot products are done on fp32 copies of the tiles: its bf16 dot
    multiplies the raw bit patterns (triton 3.x). The result is the same as a bf16 dot with fp32
    accumulation (bf16 x bf16 products are exact in fp32), so the tests check the same arithmetic.
    """
    if isinstance(kernel, InterpretedFunction):  # TRITON_INTERPRET=1 was set when this module was imported
        return kernel, True
    if device.type == "cpu":
        return _interpreted(kernel), True
    return kernel, False


def _hand_rounded(interp: bool, src: torch.dtype, dst: torch.dtype) -> bool:
    """Whether a fp32 -> bf16 cast must be rounded by hand: the interpreter's cast truncates."""
    return interp and src == torch.float32 and dst == torch.bfloat16


def _block_m(T: int) -> int:
    return 16 if T <= SMALL_T else 64


def _max_tiles(T: int, block_m: int, num_slots: int) -> int:
    # sum over slots of cdiv(count, BM) <= cdiv(T, BM) + (number of non-empty slots)
    return min(T, triton.cdiv(T, block_m) + num_slots - 1)


def _rank_strides(ranks: torch.Tensor) -> tuple[int, int]:
    return (ranks.stride(0), ranks.stride(1)) if ranks.dim() == 2 else (0, ranks.stride(0))


def shrink(x, a, h, order, seg_start, ranks, num_slots: int, n_groups: int) -> None:
    T, K = x.shape
    R = a.shape[1] // n_groups
    bm = _block_m(T)
    bn = 16 if R <= 16 else 32
    grid = (_max_tiles(T, bm, num_slots), triton.cdiv(R, bn), n_groups)
    sr_g, sr_s = _rank_strides(ranks)
    kernel, interp = _for_device(_shrink_kernel, x.device)
    kernel[grid](
        x, a, h, order, seg_start, ranks,
        K, R, num_slots,
        x.stride(0), x.stride(1), a.stride(0), a.stride(1), a.stride(2), h.stride(0), h.stride(1), sr_g, sr_s,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=BLOCK_K_SHRINK if a.element_size() < 4 else BLOCK_K_SHRINK // 2, S_PAD=triton.next_power_of_2(num_slots),
        DOT_F32=interp or a.dtype == torch.float32,
        RNE_X=_hand_rounded(interp, x.dtype, a.dtype), RNE_H=_hand_rounded(interp, torch.float32, h.dtype),
        num_warps=NUM_WARPS,
    )


def expand(y, h, b, order, seg_start, ranks, num_slots: int, group: int) -> None:
    T, N = y.shape
    R = b.shape[2]
    bm = _block_m(T)
    grid = (_max_tiles(T, bm, num_slots), triton.cdiv(N, BLOCK_N_EXPAND))
    sr_g, sr_s = _rank_strides(ranks)
    kernel, interp = _for_device(_expand_kernel, y.device)
    kernel[grid](
        y, h, b, order, seg_start, ranks,
        N, R, num_slots, group,
        y.stride(0), y.stride(1), h.stride(0), h.stride(1), b.stride(0), b.stride(1), b.stride(2), sr_g, sr_s,
        BLOCK_M=bm, BLOCK_N=BLOCK_N_EXPAND, BLOCK_K=BLOCK_K_EXPAND, S_PAD=triton.next_power_of_2(num_slots),
        DOT_F32=interp or b.dtype == torch.float32,
        RNE_H=_hand_rounded(interp, h.dtype, b.dtype), RNE_Y=_hand_rounded(interp, torch.float32, y.dtype),
        num_warps=NUM_WARPS,
    )
