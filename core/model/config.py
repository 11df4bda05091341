"""The base model's settings: shared by the server and the offline trainer, which load it alike."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

QUANTIZATIONS = ("nf4", "bf16", "fp32")
CPU_KERNELS = ("auto", "packed", "generic")


@dataclass(frozen=True)
class ModelConfig:
    path: str | None = None
    """Local Hugging Face causal-LM directory; None serves the embedded SmolLM2-135M-Instruct."""
    quantization: str = "nf4"
    """nf4 (bitsandbytes 4-bit, the default), bf16 or fp32."""
    device: str | None = None
    """torch device; None picks cuda when available, else cpu."""
    cache_dir: str | None = None
    """Where the embedded model is converted to safetensors once; None: ~/.cache/loraserve."""
    cpu_kernel: str = "auto"
    """NF4 on a CPU only: bitsandbytes' kernel. auto: packed where the CPU has AVX512-BF16, else generic;
    packed (fails without AVX512-BF16) or generic (dequantize + fp32 matmul) force one (docs/cpu-kernels.md)."""

    def __post_init__(self):
        if self.quantization not in QUANTIZATIONS:
            raise ValueError(f"--quantization must be one of {', '.join(QUANTIZATIONS)}, got {self.quantization!r}")
        if self.cpu_kernel not in CPU_KERNELS:
            raise ValueError(f"cpu_kernel must be one of {', '.join(CPU_KERNELS)}, got {self.cpu_kernel!r}")


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "loraserve"

