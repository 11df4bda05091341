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


def load_wrapped(model_dir, quantization: str) -> Wrapped:
    base = load_base(ModelConfig(path=str(model_dir), quantization=quantization, device="cpu"))
    ctx, wrapped = wrap_model(base.model, slots=2, max_rank=16, dtype=torch.float32, device=base.device)
    return Wrapped(base, ctx, wrapped)


@pytest.fixture(scope="session")
def fp32_model(tiny_model_dir) -> Wrapped:
    """Shared by the tests: training leaves the base untouched, which the loop tests check."""
    return load_wrapped(tiny_model_dir, "fp32")


@pytest.fixture(scope="session")
def nf4_model(tiny_model_dir) -> Wrapped:
    return load_wrapped(tiny_model_dir, "nf4")


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
