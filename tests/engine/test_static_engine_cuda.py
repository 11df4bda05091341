"""The static engine on CUDA: Triton LoRA kernels and captured decode steps, against PEFT and eager."""

from __future__ import annotations

import pytest
import torch
from loraserve.server.engine.row import Row
from loraserve.server.engine.static_batch import StaticBatch
from test_static_engine import generate_ref, peft_reference, request, served, write_adapters

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (runs on the GPU host)")


def run(batch, ranks, specs, prompts, n):
    rows = [Row(request(i, p, n), slot, None, 0) for i, ((slot, _), p) in enumerate(zip(specs, prompts))]
    got = {i: [] for i in range(len(rows))}
    batch.add(rows)
    with torch.inference_mode():
        while any(len(v) < n for v in got.values()):
            for row, token in batch.prefill_chunk(ranks) + batch.decode(ranks):
                got[int(row.request.request_id)].append(token)
            batch.remove([r for r in batch.rows if len(got[int(r.request.request_id)]) >= n])
    return [got[i][:n] for i in range(len(rows))]


SPECS = [(1, 5), (0, 3), (3, 17), (2, 4), (1, 9)]


def prompts(seed=9):
    torch.manual_seed(seed)
    return [torch.randint(5, 2000, (n,)).tolist() for _, n in SPECS]


def test_fp32_graphs_and_kernels_equal_peft(tiny_model_dir, adapter_sources):
    """fp32 on the GPU (kernels accumulate in IEEE fp32, no TF32): greedy tokens equal PEFT's."""
    base, ctx, wrapped = served(tiny_model_dir, adapter_sources, device="cuda")
    ranks = write_adapters(wrapped, adapter_sources, base)
    batch = StaticBatch(base, ctx, max_rows=8, max_len=64, prefill_tokens=8)
    assert batch.graphs is not None and batch.kernels
    ps = prompts()
    got = run(batch, ranks, SPECS, ps, 8)
    assert any(g is not None for g in batch.graphs.graphs.values()), "no decode step was captured"
    peft = peft_reference(tiny_model_dir, adapter_sources, device="cuda")
    for i, ((slot, _), prompt) in enumerate(zip(SPECS, ps)):
        assert got[i] == generate_ref(peft, prompt, slot, 8), f"row {i} (slot {slot})"


def test_nf4_captured_steps_equal_eager_steps(tiny_model_dir, adapter_sources):
    """NF4 with bf16 compute: replaying captured decode steps gives exactly the eager steps' tokens."""
    base, ctx, wrapped = served(tiny_model_dir, adapter_sources, quantization="nf4", device="cuda")
    ranks = write_adapters(wrapped, adapter_sources, base)
    ps = prompts(11)
    graphed = run(StaticBatch(base, ctx, max_rows=8, max_len=64, prefill_tokens=8, use_graphs=True), ranks, SPECS,
                  ps, 10)
    eager = run(StaticBatch(base, ctx, max_rows=8, max_len=64, prefill_tokens=8, use_graphs=False), ranks, SPECS,
                ps, 10)
    assert graphed == eager
