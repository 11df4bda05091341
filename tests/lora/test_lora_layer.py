"""The slot-stacked fast path equals the plain reference and PEFT's own output."""

from __future__ import annotations

import pytest
import torch
from cpu_kernels import assert_ran, count_bnb_ops, nf4_kernels
from loraserve.core.lora.layer import LoraBatch, reference_delta, wrap_model
from loraserve.core.lora.weights import load_weights
from loraserve.core.model.bnb_cpu import dequantize_weight, select_cpu_kernel
from loraserve.core.model.config import ModelConfig
from loraserve.core.model.load import load_base
from peft import PeftModel
from transformers import AutoModelForCausalLM, BitsAndBytesConfig


def loaded(base, adapter_sources, slots=3, max_rank=16):
    ctx, wrapped = wrap_model(base.model, slots, max_rank, base.compute_dtype, base.device)
    shapes = {n: (m.in_features, m.out_features) for n, m in wrapped.items()}
    adapters = [load_weights(adapter_sources / f"a{i}", shapes, max_rank, base.compute_dtype) for i in range(3)]
    ranks = [0]
    for slot, weights in enumerate(adapters, start=1):
        for name, layer in wrapped.items():
            a, b = weights.modules.get(name, (None, None))
            layer.write_slot(slot, a, b)
        ranks.append(weights.max_rank)
    return ctx, wrapped, adapters, ranks


def test_fast_path_equals_reference_per_layer(tiny_model_dir, adapter_sources):
    base = load_base(ModelConfig(path=str(tiny_model_dir), quantization="fp32"))
    ctx, wrapped, adapters, ranks = loaded(base, adapter_sources)
    rows = [1, 0, 3, 2, 1]  # mixed adapters and a base-only row
    torch.manual_seed(0)
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"):
        layer = wrapped[name]
        x = torch.randn(len(rows), 7, layer.in_features)  # [B, L, in]
        batch = LoraBatch(rows, [ranks[s] for s in rows], base.device)
        assert batch.rank == max(ranks)
        ctx.batch = batch
        with torch.no_grad():
            fast = layer(x) - layer.base(x)
        ctx.batch = None
        ref = reference_delta(x, [adapters[s - 1].modules[name] if s else None for s in rows])
        torch.testing.assert_close(fast, ref, atol=1e-5, rtol=1e-4)
        assert fast[1].abs().max() == 0  # the row without an adapter gets nothing added


# Both sides run the same kernels on the same weights (asserted for NF4) and differ only in fp32
# summation order: the mixed batch is one [4, L] GEMM where PEFT runs [1, L] per adapter (another
# blocking), and the LoRA delta is one bmm here and two matmuls in PEFT. That moves logits by ~1e-6
# on this model; 1e-4 is the bound. NF4's generic path dequantizes to fp32 on both sides alike.
FP32_SUM_ORDER = {"atol": 1e-4, "rtol": 1e-4}
# The packed AVX512-BF16 kernel rounds its input to bf16 and returns bf16, each output row computed
# alone (so batch shape does not matter). An fp32 summation-order difference in a LoRA delta can still
# move an input or output element across a bf16 rounding step (2**-8 relative): one such step on the
# largest o_proj output moves this model's logits by 1.2e-3 (measured by perturbing it). 1e-2 allows
# several, and stays far below what an adapter changes (asserted below).
BF16_KERNEL = {"atol": 1e-2, "rtol": 1e-2}


@pytest.mark.parametrize(("quantization", "kernel"),
                         [pytest.param("fp32", None, id="fp32"),
                          *[pytest.param("nf4", *p.values, id=p.id, marks=p.marks) for p in nf4_kernels()]])
def test_mixed_batch_logits_equal_peft(tiny_model_dir, adapter_sources, quantization, kernel, record_property):
    """loraserve's mixed batch equals PEFT one adapter at a time, both on the same bitsandbytes path."""
    base = load_base(ModelConfig(path=str(tiny_model_dir), quantization=quantization, device="cpu",
                                 cpu_kernel=kernel or "auto"))
    assert base.cpu_kernel == kernel
    ctx, wrapped, adapters, ranks = loaded(base, adapter_sources)
    ids = base.tokenizer(["The quick brown fox jumps over"], return_tensors="pt")["input_ids"]
    rows = [0, 1, 2, 3]
    input_ids = ids.repeat(len(rows), 1)
    ctx.batch = LoraBatch(rows, [ranks[s] for s in rows], base.device)
    with torch.no_grad(), count_bnb_ops() as ours_ops:
        ours = base.model(input_ids=input_ids).logits
    ctx.batch = None
    kw = {}
    if quantization == "nf4":
        kw["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                       bnb_4bit_compute_dtype=torch.float32,
                                                       bnb_4bit_use_double_quant=True)
    ref_base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, **kw)
    if kernel:
        select_cpu_kernel(ref_base, kernel)  # PEFT's base on the very same path
    with torch.no_grad():
        want = [ref_base(input_ids=ids).logits[0]]
    peft = PeftModel.from_pretrained(ref_base, adapter_sources / "a0", adapter_name="a0")
    peft.load_adapter(adapter_sources / "a1", adapter_name="a1")
    peft.load_adapter(adapter_sources / "a2", adapter_name="a2")
    for i in range(3):
        peft.set_adapter(f"a{i}")
        with torch.no_grad(), count_bnb_ops() as peft_ops:
            want.append(peft(input_ids=ids).logits[0])
    if kernel:
        assert_ran(ours_ops, kernel, record_property, "loraserve")
        assert_ran(peft_ops, kernel, record_property, "peft")
        # The same NF4 weights on both sides, after PEFT's loading (stock bitsandbytes re-quantized the
        # absmax of packed weights whenever PEFT took a state_dict; that drift was the Xeon failure).
        for name, layer in wrapped.items():
            theirs = peft.base_model.model.get_submodule(name).base_layer
            assert torch.equal(dequantize_weight(layer.base), dequantize_weight(theirs)), name
    want = torch.stack(want)
    tolerance = BF16_KERNEL if kernel == "packed" else FP32_SUM_ORDER
    print(f"largest logit difference {(ours - want).abs().max().item():.2e}, allowed {tolerance}")
    torch.testing.assert_close(ours, want, **tolerance)
    assert not torch.allclose(want[0], want[1], atol=10 * tolerance["atol"])  # the adapters do matter
