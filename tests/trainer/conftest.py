"""Fixtures for the trainer tests: the tiny random Llama loaded and LoRA-wrapped, and toy data."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from loraserve.core.lora.layer import LoraContext, LoraLinear, wrap_model
from loraserve.core.model.config import ModelConfig
from loraserve.core.model.load import BaseModel, load_base


@dataclass
class Wrapped:
    base: BaseModel
    ctx: LoraContext
    wrapped: dict[str, LoraLinear]


def load_wrapped(model_dir, quantization: str, cpu_kernel: str = "auto") -> Wrapped:
    base = load_base(ModelConfig(path=str(model_dir), quantization=quantization, device="cpu", cpu_kernel=cpu_kernel))
    ctx, wrapped = wrap_model(base.model, slots=2, max_rank=16, dtype=torch.float32, device=base.device)
    return Wrapped(base, ctx, wrapped)


@pytest.fixture(scope="session")
def fp32_model(tiny_model_dir) -> Wrapped:
    """Shared by the tests: training leaves the base untouched, which the loop tests check."""
    return load_wrapped(tiny_model_dir, "fp32")


@pytest.fixture(scope="session")
def nf4_models(tiny_model_dir):
    """nf4_models(kernel): the NF4 tiny model on one bitsandbytes CPU kernel path, loaded once per path."""
    loaded: dict[str, Wrapped] = {}

    def get(kernel: str = "auto") -> Wrapped:
        if kernel not in loaded:
            loaded[kernel] = load_wrapped(tiny_model_dir, "nf4", kernel)
        return loaded[kernel]

    return get


@pytest.fixture(scope="session")
def nf4_model(nf4_models) -> Wrapped:
    return nf4_models("auto")


@pytest.fixture(scope="session")
def tokenizer(fp32_model):
    return fp32_model.base.tokenizer


@pytest.fixture
def xyzzy():
    """A deterministic task: whatever the question, answer XYZZY."""

    def make(count: int = 24, answer: str = "XYZZY") -> list[dict]:
        topics = ["the sky", "a cat", "numbers", "the sea", "music", "trees"]
        return [{"prompt": f"Question {i} about {topics[i % len(topics)]}: what is the word?", "completion": answer}
                for i in range(count)]

    return make
