"""bitsandbytes' CPU kernel paths for one NF4 Linear, and what loraserve keeps fixed about them.

Every path this CPU has runs; the packed AVX512-BF16 kernel skips elsewhere, naming the missing
feature. The layout conversion, the dequantize of the packed layout, training through it and its
state_dict are plain torch and run on any CPU (core/model/bnb_cpu.py, docs/cpu-kernels.md).
"""

from __future__ import annotations

import copy

import bitsandbytes as bnb
import pytest
import torch
from cpu_kernels import (
    KERNEL_OP,
    PACKED_REASON,
    assert_ran,
    count_bnb_ops,
    nf4_kernels,
    requires_packed,
)
from loraserve.core.model import bnb_cpu
from torch import nn

BF16_STEP = 2.0 ** -8  # bf16 keeps 8 significant bits: rounding moves a value by at most 2**-8 of it


def nf4_linear(in_features=256, out_features=96, bias=True, seed=0) -> bnb.nn.Linear4bit:
    """A CPU Linear4bit quantized the way transformers loads the base (NF4, double-quantized absmax)."""
    torch.manual_seed(seed)
    plain = nn.Linear(in_features, out_features, bias=bias)
    layer = bnb.nn.Linear4bit(in_features, out_features, bias=bias, compute_dtype=torch.float32,
                              compress_statistics=True, quant_type="nf4")
    layer.load_state_dict(plain.state_dict())
    layer = layer.to("cpu")  # quantizes
    assert layer.weight.bnb_quantized and layer.weight.quant_state.nested
    return layer.eval().requires_grad_(False)


def packed_here(layer) -> bnb.nn.Linear4bit:
    """The layer in bitsandbytes' packed layout, as select_cpu_kernel leaves it; the conversion is
    plain torch, so this works on any CPU (only the packed *kernel* needs AVX512-BF16)."""
    bnb_cpu.pack(layer)
    layer.__class__ = bnb_cpu.PackedLinear4bit
    return layer


def test_auto_picks_the_fastest_path_this_cpu_has(record_property):
    layer = nf4_linear()
    chosen = bnb_cpu.select_cpu_kernel(layer, "auto")
    assert chosen == (bnb_cpu.GENERIC if PACKED_REASON else bnb_cpu.PACKED)
    assert bnb_cpu.kernel_of(layer) == chosen
    record_property("auto", f"{chosen} ({PACKED_REASON or 'AVX512-BF16 present'})")
    print(f"auto -> {chosen}: {PACKED_REASON or 'AVX512-BF16 present'}")


@pytest.mark.skipif(PACKED_REASON is None, reason="this CPU has AVX512-BF16, so the packed path can be forced")
def test_forcing_packed_without_avx512_bf16_says_why():
    with pytest.raises(ValueError, match="AVX512-BF16 \\(CPU flag avx512_bf16\\)"):
        bnb_cpu.select_cpu_kernel(nf4_linear(), "packed")


@pytest.mark.parametrize("kernel", nf4_kernels())
def test_inference_forward_takes_the_selected_path(kernel, record_property):
    """Eval mode, no grad: the chosen kernel (forcing generic works on any CPU, even one with
    AVX512-BF16, where stock bitsandbytes would pack on this very forward)."""
    layer = nf4_linear()
    assert bnb_cpu.select_cpu_kernel(layer, kernel) == kernel
    weight = bnb_cpu.dequantize_weight(layer)
    x = torch.randn(3, 5, layer.in_features)
    with torch.inference_mode(), count_bnb_ops() as ops:
        y = layer(x)
    assert_ran(ops, kernel, record_property)
    assert bnb_cpu.kernel_of(layer) == kernel  # the forward did not change the layout
    want = x @ weight.t() + layer.bias
    if kernel == bnb_cpu.GENERIC:
        # The same fp32 weights and a plain fp32 matmul: only summation order differs.
        torch.testing.assert_close(y, want, atol=1e-5, rtol=1e-5)
    else:
        # The kernel rounds x and the NF4 code values to bf16 (each product off by <= 2 * 2**-8 of
        # |x_i w_i|, summed in fp32) and rounds its output to bf16 (<= 2**-8 of |y|).
        bound = 2 * BF16_STEP * (x.abs() @ weight.abs().t()) + BF16_STEP * want.abs() + 1e-6
        assert ((y - want).abs() <= bound).all(), (y - want).abs().max()


def test_packed_layout_means_the_same_weights():
    """Packing keeps every NF4 code and rounds each block's absmax to bf16, nothing else."""
    layer = nf4_linear()
    before = bnb_cpu.dequantize_weight(layer)
    packed_here(layer)
    assert bnb_cpu.is_packed(layer) and layer.weight.quant_state.absmax.dtype == torch.bfloat16
    after = bnb_cpu.dequantize_weight(layer)
    assert ((after - before).abs() <= BF16_STEP * before.abs()).all()
    assert not torch.equal(after, before)  # the bf16 absmax do differ: these are the packed kernel's weights


def test_packed_weight_is_its_codes_times_its_bf16_absmax():
    """The dequantize of a packed weight (bitsandbytes' native kernel on a standard-layout copy of the
    codes) equals, bit for bit, the codebook value of each code bitsandbytes' own inverse conversion
    reads back, times the bf16 absmax of its block."""
    layer = packed_here(nf4_linear(in_features=384, out_features=64))
    qs = layer.weight.quant_state
    n, k = qs.shape
    data, _ = bnb.functional._convert_weight_packed_for_cpu_inverse(layer.weight.data.clone(), copy.copy(qs))
    pairs = data.view(torch.uint8).reshape(n, k // 2)
    codes = torch.stack([pairs >> 4, pairs & 0xF], dim=-1).reshape(n, k)
    want = qs.code.float()[codes.long()].view(n, k // qs.blocksize, qs.blocksize) * qs.absmax.t().float()[:, :, None]
    assert torch.equal(bnb_cpu.dequantize_weight(layer), want.view(n, k))
    assert torch.equal(bnb_cpu.dequantize_weight(layer, torch.bfloat16), want.view(n, k).to(torch.bfloat16))


@pytest.mark.parametrize("mode", ["train", "eval-with-grad"])
def test_packed_layout_trains_through_the_dequantize_path(mode):
    """A forward that needs a gradient never reaches the packed kernel (it has no backward): the packed
    weight is dequantized, and the input gets its gradient. Plain torch, so it runs on any CPU."""
    layer = packed_here(nf4_linear())
    weight = bnb_cpu.dequantize_weight(layer)
    layer.train(mode == "train")
    x = torch.randn(4, 7, layer.in_features, requires_grad=True)
    with count_bnb_ops() as ops:
        y = layer(x)
        (y.square().sum()).backward()
    assert ops[KERNEL_OP[bnb_cpu.PACKED]] == 0, dict(ops)
    xr = x.detach().clone().requires_grad_(True)
    want = xr @ weight.t() + layer.bias
    want.square().sum().backward()
    torch.testing.assert_close(y, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x.grad, xr.grad, atol=1e-5, rtol=1e-5)
    assert bnb_cpu.is_packed(layer)


def test_packed_state_dict_leaves_the_live_weight_packed():
    """state_dict writes the standard layout from a copy; stock bitsandbytes would unpack the live
    weight (and the next eval forward repack it), re-quantizing the absmax each time."""
    layer = nf4_linear()
    standard = {k: v.clone() if torch.is_tensor(v) else v for k, v in layer.state_dict().items()}
    packed_here(layer)
    data, weight = layer.weight.data.clone(), bnb_cpu.dequantize_weight(layer)
    saved = layer.state_dict()
    assert bnb_cpu.is_packed(layer) and torch.equal(layer.weight.data, data)
    assert torch.equal(bnb_cpu.dequantize_weight(layer), weight)
    assert saved.keys() == standard.keys()
    assert torch.equal(saved["weight"], standard["weight"])  # every NF4 code, in the standard layout
    state = bnb.functional.QuantState.from_dict(
        {k.removeprefix("weight."): v for k, v in saved.items() if k.startswith("weight.")}, torch.device("cpu"))
    restored = bnb.functional.dequantize_4bit(saved["weight"], state)
    # bitsandbytes re-does the absmax' 8-bit double quantization on the way out: close, not equal.
    assert (restored - weight).abs().max() <= 1e-2 * weight.abs().max()


def test_generic_selection_stops_lazy_packing():
    """bitsandbytes packs on the first eval, no-grad forward where it sees AVX512-BF16; generic
    switches that off, so on such a CPU too the layout stays standard."""
    layer = nf4_linear()
    bnb_cpu.select_cpu_kernel(layer, "generic")
    assert layer.support_avx512bf16_for_cpu is False
    with torch.no_grad():
        layer(torch.randn(2, layer.in_features))
    assert not bnb_cpu.is_packed(layer)


@requires_packed
def test_packed_selection_packs_at_load_not_at_first_forward():
    layer = nf4_linear()
    bnb_cpu.select_cpu_kernel(layer, "packed")
    assert bnb_cpu.is_packed(layer) and isinstance(layer, bnb_cpu.PackedLinear4bit)
