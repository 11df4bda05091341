"""Which bitsandbytes kernel computes the NF4 base's Linears on a CPU: chosen once at load, then kept.

bitsandbytes (0.50) has two CPU paths for a Linear4bit (docs/cpu-kernels.md has the details):

- "generic": dequantize the NF4 weight (native C kernel) and run an fp32/bf16 `linear`. Any CPU;
  differentiable (bitsandbytes' MatMul4Bit re-dequantizes in backward).
- "packed": a fused NF4 x bf16 GEMM on bitsandbytes' CPU-specific weight layout. Only on CPUs with
  AVX512-BF16 (the kernel is registered at import only when `has_avx512bf16()`). It computes in
  bf16 and has no backward.

Stock Linear4bit.forward converts its weight to the packed layout lazily, in place, on the first
forward that is in eval mode with an input that needs no grad; it never converts back on its own, so
every later forward (training too) takes the packed kernel and gradients to the input are dropped
(bitsandbytes only warns). `state_dict()` converts back in place (lossily: the absmax were rounded to
bf16) and the next eval forward packs again.

loraserve decides instead, once, when the base is loaded (`select_cpu_kernel`):
- packed: every packable Linear4bit is converted now and its class becomes PackedLinear4bit, which
  keeps that layout for good: inference (eval mode, no grad needed) runs the packed kernel, anything
  else (training mode, or an input that needs grad) a differentiable dequantize-and-matmul on the
  same packed bytes, and `state_dict()` writes the standard layout from a copy without touching
  the live weight;
- generic: lazy packing is switched off, so no forward ever changes the layout.
"""

from __future__ import annotations

import copy
import logging

import bitsandbytes as bnb
import torch
from torch import nn

log = logging.getLogger(__name__)

KERNELS = ("auto", "packed", "generic")
PACKED = "packed"
GENERIC = "generic"

_BLOCK_N = 32  # bitsandbytes' packed layout: 32 output rows per block, two nibbles of K per byte


def packed_unavailable_reason() -> str | None:
    """None when the packed kernel can run here; else why not, naming the missing CPU feature."""
    functional = bnb.functional
    if not all(hasattr(functional, f) for f in ("_convert_weight_packed_for_cpu", "has_avx512bf16")):
        return f"bitsandbytes {bnb.__version__} has no CPU-packed NF4 layout"
    if not functional.has_avx512bf16():
        return ("bitsandbytes' packed NF4 CPU kernel needs AVX512-BF16 (CPU flag avx512_bf16), "
                "which this CPU lacks")
    if not torch._C._dispatch_has_kernel_for_dispatch_key("bitsandbytes::gemv_4bit", "CPU"):
        return "bitsandbytes registered no CPU kernel for its packed layout (bitsandbytes::gemv_4bit)"
    return None


def packed_available() -> bool:
    return packed_unavailable_reason() is None


def linear4bit_modules(model: nn.Module) -> dict[str, nn.Module]:
    return {name: m for name, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}


def is_packed(module: nn.Module) -> bool:
    return bool(getattr(getattr(module.weight, "quant_state", None), "packing_format_for_cpu", False))


def kernel_of(module: nn.Module) -> str:
    """The kernel an inference forward of this Linear4bit runs: packed or generic (never changes)."""
    return PACKED if is_packed(module) else GENERIC


def _packable(module: nn.Module) -> bool:
    qs = module.weight.quant_state
    n, k = qs.shape
    return (module.weight.device.type == "cpu" and qs.quant_type in ("nf4", "fp4") and n % _BLOCK_N == 0
            and k % 2 == 0 and k % qs.blocksize == 0)


def select_cpu_kernel(model: nn.Module, kernel: str = "auto") -> str:
    """Fix the kernel of every CPU Linear4bit in `model`; returns the one chosen (packed or generic).

    auto: packed where this CPU has it, else generic. packed on a CPU without it raises ValueError.
    """
    if kernel not in KERNELS:
        raise ValueError(f"cpu kernel must be one of {', '.join(KERNELS)}, got {kernel!r}")
    modules = {n: m for n, m in linear4bit_modules(model).items() if m.weight.device.type == "cpu"}
    reason = packed_unavailable_reason()
    if kernel == "packed" and reason is not None:
        raise ValueError(f"cpu kernel 'packed' cannot run here: {reason}")
    chosen = PACKED if kernel == PACKED or (kernel == "auto" and reason is None) else GENERIC
    if chosen == GENERIC:
        if any(is_packed(m) for m in modules.values()):
            raise ValueError("the model's weights are already in bitsandbytes' packed CPU layout; "
                             "load it again to run the generic kernel")
        for m in modules.values():
            m.support_avx512bf16_for_cpu = False  # no forward will repack it behind our back
        return GENERIC
    left = []
    for name, m in modules.items():
        if not is_packed(m):
            if not _packable(m):
                m.support_avx512bf16_for_cpu = False
                left.append(name)
                continue
            pack(m)
        m.__class__ = PackedLinear4bit
    if left:
        log.warning("%d Linear4bit layers have shapes bitsandbytes cannot pack; they run the generic kernel: %s",
                    len(left), ", ".join(left[:5]))
    return PACKED


def pack(module: nn.Module) -> None:
    """Convert one Linear4bit's weight to bitsandbytes' packed CPU layout, in place (bf16 absmax)."""
    functional = bnb.functional
    with torch.inference_mode(False), torch.no_grad():
        data, state = functional._convert_weight_packed_for_cpu(module.weight.data, module.weight.quant_state)
    module.weight.data = data
    module.weight.quant_state = state
    module.quant_state = state


def _packed_codes(packed: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """The [n, k] 4-bit codes of bitsandbytes' packed layout (the inverse of its packing, no copy kept).

    The layout: [n, k/2] bytes in groups of 32 for each (block of 32 rows, pair of columns); byte i
    of a group holds row i//2 (low nibble) and row 16 + i//2 (high nibble), column 2*pair + i%2.
    """
    p = packed.view(torch.uint8).reshape(n // _BLOCK_N, k // 2, 16, 2)
    codes = torch.cat([p & 0xF, p >> 4], dim=2)  # [n/32, k/2, 32 rows, 2 columns]
    return codes.permute(0, 2, 1, 3).reshape(n, k)


def dequantize_weight(module: nn.Module, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The [out, in] weight a Linear4bit means, from either layout; the module is not changed.

    Packed: the absmax are the bf16 ones the packed kernel uses. Both run bitsandbytes' native
    dequantize; a packed weight's codes are read from a standard-layout copy (`_standard_codes`).
    """
    weight, qs = module.weight, module.weight.quant_state
    if not is_packed(module):
        return bnb.functional.dequantize_4bit(weight.data, qs).to(dtype)
    codes, absmax = _standard_codes(module)
    out = torch.ops.bitsandbytes.dequantize_4bit(codes, absmax, qs.blocksize, qs.quant_type, list(qs.shape),
                                                 torch.float32)
    return out.to(dtype)


def _standard_codes(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """A packed weight's codes in bitsandbytes' standard layout (row-major, two per byte, the even
    column in the high nibble) and the packed kernel's bf16 absmax as float32, one per block: what
    its native dequantize reads. Unpacking the layout in torch ops on every training forward and
    backward cost more than the matmuls (a SmolLM2-135M training step took 1.10 s instead of 0.62 s:
    docs/cpu-kernels.md), so the copy is made once, on the first call (0.56 bytes per weight), and
    kept: the weight is frozen and never leaves the packed layout."""
    cached = getattr(module, "_loraserve_standard_codes", None)
    if cached is not None:
        return cached
    qs = module.weight.quant_state
    n, k = qs.shape
    with torch.no_grad():
        codes = _packed_codes(module.weight.data, n, k)
        standard = ((codes[:, 0::2] << 4) | codes[:, 1::2]).contiguous()
        absmax = qs.absmax.t().to(torch.float32).contiguous().reshape(-1)
    module._loraserve_standard_codes = (standard, absmax)
    return standard, absmax


class _DequantizedLinear(torch.autograd.Function):
    """x @ W^T with W dequantized from the module in forward and again in backward (nothing saved)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, module: nn.Module) -> torch.Tensor:
        ctx.module = module
        return x @ dequantize_weight(module, x.dtype).t()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        if not ctx.needs_input_grad[0]:
            return None, None
        return grad @ dequantize_weight(ctx.module, grad.dtype), None


def dequantized_linear(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The Linear4bit's output by dequantize-and-matmul, with a gradient for x (frozen weight)."""
    compute = module.compute_dtype or x.dtype
    y = _DequantizedLinear.apply(x.to(compute), module)
    if module.bias is not None:
        y = y + module.bias.to(compute)
    return y.to(x.dtype)


class PackedLinear4bit(bnb.nn.Linear4bit):
    """A Linear4bit kept in bitsandbytes' packed CPU layout (select_cpu_kernel makes these).

    Inference (eval mode, input needs no grad): bitsandbytes' packed kernel, as stock. Training mode or
    an input that needs grad: dequantize the packed weight and matmul, differentiable in x, where stock
    bitsandbytes would run the packed kernel and drop the gradient. state_dict: the standard layout,
    converted from a copy, so the live weight stays packed.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if is_packed(self) and (self.training or (torch.is_grad_enabled() and x.requires_grad)):
            return dequantized_linear(self, x)
        return super().forward(x)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        if not is_packed(self):
            return super()._save_to_state_dict(destination, prefix, keep_vars)
        with torch.no_grad():
            data, state = bnb.functional._convert_weight_packed_for_cpu_inverse(
                self.weight.data, copy.copy(self.weight.quant_state))
        destination[prefix + "weight"] = data
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()
        for key, value in state.as_dict(packed=True).items():
            destination[prefix + "weight." + key] = value
