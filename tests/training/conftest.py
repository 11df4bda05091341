"""Fixtures for the TrainingService tests: a tiny model that can learn a fixed answer, task data."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

TOPICS = ["the sky", "a cat", "numbers", "the sea", "music", "trees", "bread", "a river"]
ANSWER = "XYZZY"
# Prompts the adapter never saw in training: it must answer them with ANSWER too.
UNSEEN = ["What is the capital of France?", "Tell me a story about a dragon.", "How many legs does a spider have?"]
# Enough to reach the answer greedily, EOS included, on the learnable model (about 5-10 s on 2 cores).
LEARN = {"rank": 8, "alpha": 16.0, "dropout": 0.0, "learning_rate": 2e-2, "max_steps": 30, "batch_size": 8,
         "warmup_ratio": 0.0, "lr_scheduler": "constant", "eval_fraction": 0.125, "eval_steps": 10,
         "template": "chat"}


def make_learnable_model_dir(path: Path) -> Path:
    """A tiny random Llama that LoRA can teach a fixed answer, unlike tests/conftest.py's.

    Two things stop the standard tiny model from ever generating a learned answer and its EOS:
    with pad == EOS, transformers zeroes the embedding row of the padding id, and with tied
    embeddings that row is also EOS's output vector, so EOS is never predicted; and with the final
    RMSNorm and an init std of 0.02, every logit stays within about +-1.3, so no answer token can
    win decisively. No padding id and a wider init fix both."""
    from loraserve.core.model.load import ensure_embedded_model
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(ensure_embedded_model())
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True,
        initializer_range=0.2, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=None,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def learnable_model_dir(tmp_path_factory) -> Path:
    return make_learnable_model_dir(tmp_path_factory.mktemp("learnable-llama"))


@pytest.fixture(scope="session")
def task_examples() -> list[dict]:
    """Whatever the question, answer XYZZY."""
    return [{"prompt": f"Question {i} about {TOPICS[i % len(TOPICS)]}: what is the word?", "completion": ANSWER}
            for i in range(32)]


@pytest.fixture(scope="session")
def learn_settings() -> dict:
    return dict(LEARN)


@pytest.fixture(scope="session")
def unseen_prompts() -> list[str]:
    return list(UNSEEN)
