"""The Triton LoRA kernels (server/lora/ops.py) equal the plain torch references.

On CPU the kernels run in Triton's interpreter (the launcher picks it for CPU tensors; no
TRITON_INTERPRET needed, which would be too late anyway: bitsandbytes imports triton first), so
these cases use small sizes. With CUDA the same kernel source is compiled and tested on the GPU at
real sizes, CUDA-graph capture included.

Tolerances, and why:
* h (fp32) vs the reference: both accumulate the same fp32 products (x cast to A's dtype first,
  bf16 x bf16 products are exact in fp32), only the summation order differs: rtol = atol = 1e-4
  with inputs scaled to O(1) results.
* y in fp32: same reasoning, 1e-4.
* y in bf16: the fp32 sums agree to ~1e-6, but rounding y + delta to bf16 can then land on either
  side of a rounding boundary: one bf16 ulp, <= 2**-7 relative (8 significant bits) -> rtol 2**-7.
  End to end (fast h feeding fast expand) h is also rounded to bf16 before the second product,
  which can move a term by one bf16 ulp: rtol 2**-6 there.
"""

from __future__ import annotations

import pytest
import torch
from loraserve.server.lora import ops
from loraserve.server.lora.ops import (
    lora_expand,
    lora_expand_reference,
    lora_meta,
    lora_shrink,
    lora_shrink_reference,
    triton_available,
)

needs_triton = pytest.mark.skipif(not triton_available(), reason="triton is not installed")
needs_cuda = pytest.mark.skipif(not (torch.cuda.is_available() and triton_available()),
                                reason="needs a CUDA GPU and triton (compiled kernels)")

BF16_RTOL = 2.0 ** -7


def make_weights(S, R, G, K, N, dtype, device="cpu", seed=0, ranks=None):
    """A [S, G*R, in] and B [S, out, R] like the layer's buffers: slot 0 zeros, rank r fills [:r].

    Default ranks cycle through 1, R, R/2 + 1, R - 3, 3 % R + 1 (odd ones, the extremes).
    """
    g = torch.Generator().manual_seed(seed)
    if ranks is None:
        ranks = torch.zeros(S, dtype=torch.int32)
        choices = [1, R, max(1, R // 2 + 1), max(1, R - 3), 3 % R + 1]
        for s in range(1, S):
            ranks[s] = choices[(s - 1) % len(choices)]
    a = torch.zeros(S, G * R, K)
    b = torch.zeros(S, N, R)
    for s in range(1, S):
        r = int(ranks[s])
        for grp in range(G):
            a[s, grp * R:grp * R + r] = torch.randn(r, K, generator=g) / K ** 0.5
        b[s, :, :r] = torch.randn(N, r, generator=g) / r ** 0.5
    return a.to(device, dtype), b.to(device, dtype), ranks.to(device)


def random_idx(T, S, seed, device="cpu", dtype=torch.int32):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, S, (T,), generator=g).to(device, dtype)


def segment_idx(lengths_and_slots, device="cpu", dtype=torch.int64):
    """Prefill layout: contiguous runs of one slot (a slot may come back later; slot 0 runs too)."""
    return torch.cat([torch.full((n,), s, dtype=dtype) for n, s in lengths_and_slots]).to(device)


def valid_mask(idx, ranks, G, R):
    """[T, G*R] True where h is defined: an adapter row and a column below that slot's rank."""
    per_group = ranks.expand(G, -1) if ranks.dim() == 1 else ranks[:G]  # [G, S]
    r = per_group.long()[:, idx.long()]  # [G, T]
    col = torch.arange(R, device=idx.device)
    m = (col[None, None, :] < r[:, :, None]) & (idx[None, :, None] != 0)  # [G, T, R]
    return m.permute(1, 0, 2).reshape(len(idx), G * R)


def check_shrink(x, a, idx, ranks, G, rtol=1e-4, atol=1e-4):
    R = a.shape[1] // G
    ref = lora_shrink_reference(x, a, idx, ranks, G)
    got = lora_shrink(x, a, idx, ranks, G)
    m = valid_mask(idx, ranks, G, R)
    torch.testing.assert_close(got[m], ref[m], rtol=rtol, atol=atol)
    return ref


def check_expand(y, h, b, idx, ranks, group, rtol, atol):
    """Expand from the same h, whose undefined entries hold NaN: the kernel must never read them."""
    R = b.shape[2]
    G = h.shape[1] // R
    h = h.clone()
    h[~valid_mask(idx, ranks, G, R)] = float("nan")
    ref = lora_expand_reference(y.clone(), h, b, idx, ranks, group)
    got = lora_expand(y.clone(), h, b, idx, ranks, group)
    assert not got.isnan().any()
    torch.testing.assert_close(got, ref, rtol=rtol, atol=atol)
    no_adapter = idx == 0
    assert torch.equal(got[no_adapter], y[no_adapter])  # rows without an adapter: untouched, bit for bit
    return got


# (R, G, in, out, T, dtype, layout): a spread over the grid that keeps the interpreter quick
CASES = [
    (8, 1, 576, 49, 7, torch.float32, "random"),
    (8, 2, 49, 1536, 1, torch.bfloat16, "random"),
    (16, 3, 576, 49, 64, torch.bfloat16, "random"),
    (16, 1, 49, 576, 300, torch.float32, "segments"),
    (64, 3, 49, 49, 7, torch.float32, "random"),
    (64, 2, 576, 49, 300, torch.bfloat16, "segments"),
    (16, 2, 1536, 49, 64, torch.float32, "segments"),
    (64, 1, 49, 576, 64, torch.bfloat16, "random"),
]


def case_idx(layout, T, S, seed):
    if layout == "random":
        return random_idx(T, S, seed)
    # prefill-like: segments of various lengths incl. slot 0 and a slot that comes back
    cuts = [T // 3, T // 5, 1, T // 4]
    lengths = [c for c in cuts if c > 0]
    lengths.append(T - sum(lengths))
    slots = [2, 0, S - 1, 1, 2]
    return segment_idx(list(zip(lengths, slots)), dtype=torch.int64)


@needs_triton
@pytest.mark.parametrize("R,G,K,N,T,dtype,layout", CASES)
def test_shrink_and_expand_match_reference(R, G, K, N, T, dtype, layout):
    S = 6
    a, b, ranks = make_weights(S, R, G, K, N, dtype, seed=R + K)
    x = torch.randn(T, K).to(dtype)
    idx = case_idx(layout, T, S, seed=T)
    h = check_shrink(x, a, idx, ranks, G)
    y = torch.randn(T, N).to(dtype)
    tol = {"rtol": 1e-4, "atol": 1e-4} if dtype == torch.float32 else {"rtol": BF16_RTOL, "atol": 1e-3}
    check_expand(y, h, b, idx, ranks, G - 1, **tol)


@needs_triton
def test_every_rank_from_1_to_R_and_slot_zero():
    """One slot per rank 1..R (R = 16) plus slot 0 rows, fused gate/up (G = 2), both groups expanded."""
    R, G, K, N = 16, 2, 49, 49
    S = R + 1
    ranks = torch.arange(S, dtype=torch.int32)  # slot s has rank s (slot 0: none)
    a, b, _ = make_weights(S, R, G, K, N, torch.float32, seed=3, ranks=ranks)
    idx = torch.arange(2 * S, dtype=torch.int64) % S  # every slot twice, slot 0 included
    x = torch.randn(len(idx), K)
    h = check_shrink(x, a, idx, ranks, G)
    for g in range(G):
        check_expand(torch.randn(len(idx), N), h, b, idx, ranks, g, rtol=1e-4, atol=1e-4)


@needs_triton
def test_end_to_end_equals_plain_lora_delta():
    """Fast shrink -> fast expand per projection == x A_q^T B_q^T per row (the layer's definition)."""
    R, G, K = 16, 3, 96
    outs = [64, 32, 32]  # q, k, v
    S = 5
    a, _, ranks = make_weights(S, R, G, K, 8, torch.bfloat16, seed=7)
    bs = [make_weights(S, R, 1, K, n, torch.bfloat16, seed=20 + i)[1] for i, n in enumerate(outs)]
    idx = torch.tensor([0, 3, 1, 1, 4, 0, 2, 3, 3], dtype=torch.int32)
    T = len(idx)
    x = torch.randn(T, K).to(torch.bfloat16)
    meta = lora_meta(idx, S)
    h = lora_shrink(x, a, idx, ranks, G, meta=meta)
    for g, (n, b) in enumerate(zip(outs, bs)):
        y0 = torch.randn(T, n).to(torch.bfloat16)
        y = lora_expand(y0.clone(), h, b, idx, ranks, g, meta=meta)
        want = y0.float().clone()
        for t in range(T):
            s = int(idx[t])
            if s:
                r = int(ranks[s])
                want[t] += (x[t].float() @ a[s, g * R:g * R + r].float().T) @ b[s, :, :r].float().T
        torch.testing.assert_close(y.float(), want, rtol=2 * BF16_RTOL, atol=1e-2)


@needs_triton
def test_a_token_does_not_depend_on_the_rest_of_the_batch():
    R, G, K, N, S, T = 16, 2, 64, 48, 6, 20
    a, b, ranks = make_weights(S, R, G, K, N, torch.float32, seed=11)
    x = torch.randn(T, K)
    idx = random_idx(T, S, seed=1)
    idx[5] = 3
    y = torch.randn(T, N)

    def row5(x, idx, y):
        h = lora_shrink(x, a, idx, ranks, G)
        out = lora_expand(y.clone(), h, b, idx, ranks, 1)
        return h[5, R:R + int(ranks[3])], out[5]

    h1, y1 = row5(x, idx, y)
    # other rows: new inputs, other slots (so token 5 lands elsewhere in its tile); same T
    x2, y2, idx2 = torch.randn(T, K), torch.randn(T, N), random_idx(T, S, seed=2)
    x2[5], y2[5], idx2[5] = x[5], y[5], 3
    h2, out2 = row5(x2, idx2, y2)
    assert torch.equal(h1, h2) and torch.equal(y1, out2)
    # alone in the batch (T = 1): equal up to summation order
    h3 = lora_shrink(x[5:6], a, idx[5:6], ranks, G)
    y3 = lora_expand(y[5:6].clone(), h3, b, idx[5:6], ranks, 1)
    torch.testing.assert_close(h3[0, R:R + int(ranks[3])], h1, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y3[0], y1, rtol=1e-5, atol=1e-5)


@needs_triton
def test_strided_view_of_the_fused_buffer_and_per_group_ranks():
    """a = one projection's R-row block of the fused [S, 3R, in] buffer; ranks [G, S] (0 = untargeted)."""
    R, G, K, N, S, T = 8, 3, 40, 24, 4, 9
    fused, b, ranks = make_weights(S, R, G, K, N, torch.float32, seed=5)
    idx = torch.tensor([1, 2, 3, 0, 1, 3, 3, 2, 1])
    x = torch.randn(T, K)
    h_all = lora_shrink(x, fused, idx, ranks, G)
    view = fused[:, R:2 * R]  # k_proj's block: strides (3R*in, in, 1)
    assert not view.is_contiguous()
    h_k = lora_shrink(x, view, idx, ranks, 1)
    m = valid_mask(idx, ranks, 1, R)
    torch.testing.assert_close(h_k[m], h_all[:, R:2 * R][m], rtol=1e-5, atol=1e-5)

    per_group = ranks.repeat(G, 1)
    per_group[1, 2] = 0  # adapter in slot 2 does not target k_proj
    h = check_shrink(x, fused, idx, per_group, G)
    y = torch.randn(T, N)
    got = lora_expand(y.clone(), h, b, idx, per_group, 1)
    assert torch.equal(got[idx == 2], y[idx == 2])
    ref = lora_expand_reference(y.clone(), h, b, idx, per_group, 1)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


@needs_triton
def test_output_buffer_and_mixed_input_dtype():
    """out= is written in place (bf16 h here); x in fp32 with bf16 weights is cast to bf16 first."""
    R, G, K, N, S, T = 16, 1, 64, 40, 3, 7
    a, b, ranks = make_weights(S, R, G, K, N, torch.bfloat16, seed=9)
    x = torch.randn(T, K)
    idx = torch.tensor([1, 2, 0, 2, 1, 1, 2])
    out = torch.full((T, G * R), 7.0, dtype=torch.bfloat16)
    h = lora_shrink(x, a, idx, ranks, G, out=out)
    assert h is out
    ref = lora_shrink_reference(x, a, idx, ranks, G, out=torch.full((T, G * R), 7.0, dtype=torch.bfloat16))
    torch.testing.assert_close(h.float(), ref.float(), rtol=BF16_RTOL, atol=1e-3)
    assert (h[idx == 0] == 7).all()  # no work for rows without an adapter
    y = torch.randn(T, N)  # fp32 output with bf16 weights
    torch.testing.assert_close(lora_expand(y.clone(), h, b, idx, ranks, 0),
                               lora_expand_reference(y.clone(), h, b, idx, ranks, 0), rtol=1e-4, atol=1e-4)


def test_meta_groups_tokens_by_slot():
    idx = torch.tensor([2, 0, 2, 1, 3, 0, 2], dtype=torch.int32)
    meta = lora_meta(idx, 5)
    assert meta.seg_start.tolist() == [0, 2, 3, 6, 7, 7]
    assert meta.order.tolist() == [1, 5, 3, 0, 2, 6, 4]  # stable: a slot's tokens keep their order
    seg = segment_idx([(3, 1), (2, 0), (4, 2)])
    meta = lora_meta(seg, 3)
    assert meta.seg_start.tolist() == [0, 2, 5, 9]
    assert meta.order.tolist() == [3, 4, 0, 1, 2, 5, 6, 7, 8]


def test_references_follow_the_definition():
    """The references themselves, against a per-token loop (so the kernels are checked against truth)."""
    R, G, K, N, S, T = 8, 2, 12, 10, 4, 11
    a, b, ranks = make_weights(S, R, G, K, N, torch.float32, seed=1)
    idx = random_idx(T, S, seed=4)
    x = torch.randn(T, K)
    h = lora_shrink_reference(x, a, idx, ranks, G)
    y0 = torch.randn(T, N)
    y = lora_expand_reference(y0.clone(), h, b, idx, ranks, 1)
    for t in range(T):
        s, r = int(idx[t]), int(ranks[idx[t]])
        want_h = torch.zeros(G * R)
        want_y = y0[t].clone()
        if s:
            for g in range(G):
                want_h[g * R:g * R + r] = a[s, g * R:g * R + r] @ x[t]
            want_y += b[s, :, :r] @ want_h[R:R + r]
        torch.testing.assert_close(h[t], want_h)
        torch.testing.assert_close(y[t], want_y)


def test_without_triton_the_fast_functions_say_so(monkeypatch):
    monkeypatch.setattr(ops, "triton_available", lambda: False)
    x, idx = torch.randn(2, 4), torch.tensor([0, 1])
    a, b, ranks = torch.zeros(2, 8, 4), torch.zeros(2, 3, 8), torch.tensor([0, 8], dtype=torch.int32)
    with pytest.raises(RuntimeError, match="triton"):
        lora_shrink(x, a, idx, ranks, 1)
    with pytest.raises(RuntimeError, match="triton"):
        lora_expand(torch.zeros(2, 3), torch.zeros(2, 8), b, idx, ranks, 0)
    assert lora_shrink_reference(x, a, idx, ranks, 1).shape == (2, 8)  # references need no triton


@needs_triton
def test_kernels_compile_for_hopper_without_a_gpu():
    """The compiled path (not the interpreter) builds for sm_90 even where no GPU is present."""
    import inspect

    import triton
    from loraserve.server.lora import triton_ops
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    def compile_for(kernel, pointers, constexprs):
        names = inspect.signature(kernel.fn).parameters
        signature = {n: "constexpr" if n in constexprs else pointers.get(n, "i32") for n in names}
        src = ASTSource(kernel, signature, constexprs=constexprs)
        return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": triton_ops.NUM_WARPS})

    if not isinstance(triton_ops._shrink_kernel, triton.runtime.JITFunction):
        pytest.skip("TRITON_INTERPRET=1 was set when the kernels were defined: nothing to compile")
    common = {"order_ptr": "*i64", "seg_ptr": "*i64", "ranks_ptr": "*i32"}
    for dt, bm_shrink, bm_expand in (("bf16", 64, 16),):  # the serving dtype (each build ~3 s on a CPU)
        f32 = dt == "fp32"
        shrink = compile_for(triton_ops._shrink_kernel,
                             {"x_ptr": f"*{dt}", "a_ptr": f"*{dt}", "h_ptr": "*fp32", **common},
                             dict(BLOCK_M=bm_shrink, BLOCK_N=32, BLOCK_K=64 if f32 else 128, S_PAD=128,
                                  DOT_F32=f32, RNE_X=False, RNE_H=False))
        expand = compile_for(triton_ops._expand_kernel,
                             {"y_ptr": f"*{dt}", "h_ptr": "*fp32", "b_ptr": f"*{dt}", **common},
                             dict(BLOCK_M=bm_expand, BLOCK_N=128, BLOCK_K=16, S_PAD=128,
                                  DOT_F32=f32, RNE_H=False, RNE_Y=False))
        for k in (shrink, expand):
            assert f32 or "mma" in k.asm["ptx"]  # bf16: tensor-core products, not a scalar loop


# --- GPU: compiled kernels at real sizes ---------------------------------------------------------


def gpu_case(S, R, G, K, N, T, layout, dtype=torch.bfloat16, seed=0):
    dev = "cuda"
    a, b, ranks = make_weights(S, R, G, K, N, dtype, device=dev, seed=seed)
    x = torch.randn(T, K, device=dev).to(dtype)
    if layout == "random":
        idx = random_idx(T, S, seed=seed + 1, device=dev)
    else:  # prefill: 8 requests of uneven lengths, two without adapter, one adapter used twice
        n = [T // 16, T // 4, T // 8, 1, T // 8, T // 16, T // 4]
        n.append(T - sum(n))
        idx = segment_idx(list(zip(n, [5, 0, 17, 64, 5, 0, 33, 2])), device=dev, dtype=torch.int32)
    return a, b, ranks, x, idx


@needs_cuda
@pytest.mark.parametrize("T,layout", [(64, "random"), (2048, "segments"), (2048, "random")])
@pytest.mark.parametrize("R", [16, 64])
def test_gpu_real_sizes(T, layout, R):
    S, K, G = 65, 2048, 3
    outs = [2048, 512, 8192]
    a, _, ranks, x, idx = gpu_case(S, R, G, K, 8, T, layout)
    h = check_shrink(x, a, idx, ranks, G)
    for g, n in enumerate(outs):
        b = make_weights(S, R, 1, K, n, torch.bfloat16, device="cuda", seed=50 + g)[1]
        check_expand(torch.randn(T, n, device="cuda").to(torch.bfloat16), h, b, idx, ranks, g,
                     rtol=BF16_RTOL, atol=1e-3)


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_gpu_other_dtypes(dtype):
    S, R, G, K, N, T = 65, 16, 2, 2048, 512, 64
    a, b, ranks, x, idx = gpu_case(S, R, G, K, N, T, "random", dtype=dtype)
    h = check_shrink(x, a, idx, ranks, G)
    tol = {"rtol": 1e-4, "atol": 1e-4} if dtype == torch.float32 else {"rtol": 2.0 ** -10, "atol": 1e-3}
    check_expand(torch.randn(T, N, device="cuda").to(dtype), h, b, idx, ranks, 1, **tol)


@needs_cuda
def test_gpu_batch_invariance_and_cuda_graph():
    """Bitwise batch invariance on the GPU, and meta + shrink + expand captured in one CUDA graph."""
    S, R, G, K, N, T = 65, 16, 3, 2048, 2048, 256
    a, b, ranks, x, idx = gpu_case(S, R, G, K, N, T, "random")
    y = torch.randn(T, N, device="cuda").to(torch.bfloat16)
    idx[10] = 7

    def step(x, idx, y):
        meta = lora_meta(idx, S)
        h = lora_shrink(x, a, idx, ranks, G, meta=meta)
        return h, lora_expand(y, h, b, idx, ranks, 2, meta=meta)

    h1, y1 = step(x, idx, y.clone())
    x2, idx2, y2 = torch.randn_like(x), random_idx(T, S, seed=9, device="cuda"), torch.randn_like(y)
    x2[10], idx2[10], y2[10] = x[10], 7, y[10]
    h2, out2 = step(x2, idx2, y2)
    r = int(ranks[7])
    assert torch.equal(h1[10, :r], h2[10, :r]) and torch.equal(y1[10], out2[10])

    # capture with static buffers, then replay on new contents (warm-up compiles outside capture)
    sx, sidx, sy = x.clone(), idx.clone(), y.clone()
    step(sx, sidx, sy.clone())
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        _, gy = step(sx, sidx, sy)
    for seed in (1, 2):
        new_x = torch.randn_like(x)
        new_idx = random_idx(T, S, seed=100 + seed, device="cuda")
        new_y = torch.randn_like(y)
        sx.copy_(new_x)
        sidx.copy_(new_idx)
        sy.copy_(new_y)
        graph.replay()
        torch.cuda.synchronize()
        h_ref = lora_shrink_reference(new_x, a, new_idx, ranks, G)
        want = lora_expand_reference(new_y.clone(), h_ref, b, new_idx, ranks, 2)
        torch.testing.assert_close(gy, want, rtol=2 * BF16_RTOL, atol=1e-2)
