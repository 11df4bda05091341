"""The base model's settings: shared by the server and the offline trainer, which load it alike."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

QUANTIZATIONS = ("nf4", "bf16", "fp32")


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

    def __post_init__(self):
        if self.quantization not in QUANTIZATIONS:
            raise ValueError(f"--quantization must be one of {', '.join(QUANTIZATIONS)}, got {self.quantization!r}")


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "loraserve"

