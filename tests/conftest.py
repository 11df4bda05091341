"""Shared fixtures: tiny random Llama models on the embedded tokenizer (CPU, seconds)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def make_tiny_model_dir(path: Path, seed: int = 0, layers: int = 2) -> Path:
    """A random LlamaForCausalLM small enough for CPU tests, with SmolLM2's real tokenizer."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from server.model.load import ensure_embedded_model

    embedded = ensure_embedded_model()
    tokenizer = AutoTokenizer.from_pretrained(embedded)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def embedded_model_dir() -> Path:
    from server.model.load import ensure_embedded_model

    return ensure_embedded_model()
