"""The bitsandbytes CPU kernel paths NF4 tests run on: each one this CPU has; the others skip, saying why.

Tests take a kernel name ("generic" or "packed") from nf4_kernels() and record which path really ran:
count_bnb_ops() counts the bitsandbytes ops a block calls (gemm_4bit: generic dequantize + matmul;
gemv_4bit: the packed AVX512-BF16 kernel), which assert_ran() checks and records as a property.
"""

from __future__ import annotations

import collections
import contextlib

import pytest
from loraserve.core.model import bnb_cpu
from torch.utils._python_dispatch import TorchDispatchMode

PACKED_REASON = bnb_cpu.packed_unavailable_reason()
requires_packed = pytest.mark.skipif(PACKED_REASON is not None, reason=f"packed path: {PACKED_REASON}")

# The op a Linear4bit inference forward calls on each path.
KERNEL_OP = {bnb_cpu.GENERIC: "bitsandbytes.gemm_4bit", bnb_cpu.PACKED: "bitsandbytes.gemv_4bit"}


def nf4_kernels(prefix: str = "nf4") -> list:
    """pytest params for every CPU kernel path: generic always, packed where the CPU has it."""
    return [pytest.param(bnb_cpu.GENERIC, id=f"{prefix}-generic"),
            pytest.param(bnb_cpu.PACKED, id=f"{prefix}-packed", marks=requires_packed)]


class _Counter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket)  # e.g. bitsandbytes.gemm_4bit
        if name.startswith("bitsandbytes."):
            self.ops[name] += 1
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def count_bnb_ops():
    """Counts the bitsandbytes ops called inside the block: {op name: calls}."""
    counter = _Counter()
    with counter:
        yield counter.ops


def assert_ran(ops, kernel: str, record_property=None, what: str = "forward") -> None:
    """The block ran `kernel`'s op and not the other path's; records which in the test report."""
    other = KERNEL_OP[bnb_cpu.PACKED if kernel == bnb_cpu.GENERIC else bnb_cpu.GENERIC]
    assert ops[KERNEL_OP[kernel]] > 0 and ops[other] == 0, dict(ops)
    line = f"{what}: bitsandbytes CPU {kernel} path ({KERNEL_OP[kernel]} x{ops[KERNEL_OP[kernel]]})"
    print(line)
    if record_property is not None:
        record_property(f"cpu_kernel[{what}]", line)


def assert_layout(model, kernel: str) -> None:
    """Every Linear4bit of the model is (still) on the kernel chosen at load."""
    kernels = {name: bnb_cpu.kernel_of(m) for name, m in bnb_cpu.linear4bit_modules(model).items()}
    assert kernels and set(kernels.values()) == {kernel}, kernels
