"""Shared fixtures: tiny random Llama models on the embedded tokenizer (CPU, seconds)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from tiny_models import TAGS, make_peft_adapter, make_peft_task_adapter, make_tiny_model_dir

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def embedded_model_dir() -> Path:
    from loraserve.core.model.load import ensure_embedded_model

    return ensure_embedded_model()


@pytest.fixture(scope="session")
def adapter_sources(tiny_model_dir, tmp_path_factory) -> Path:
    """Three random PEFT adapters for the tiny model: a0, a1, a2 (copy them into an adapter root)."""
    root = tmp_path_factory.mktemp("adapter-sources")
    for i in range(3):
        make_peft_adapter(tiny_model_dir, root / f"a{i}", seed=100 + i, rank=4 + 4 * i)
    return root


@pytest.fixture(scope="session")
def task_adapter_sources(tiny_model_dir, tmp_path_factory) -> Path:
    """Random task adapters made by stock PEFT for the tiny model: t-cls (seq_cls, 3 labels, default
    names LABEL_i), t-tag (token_cls, the 5 tags TAGS, named in loraserve_metadata.json) and t-qa (qa)."""
    root = tmp_path_factory.mktemp("task-adapter-sources")
    make_peft_task_adapter(tiny_model_dir, root / "t-cls", "seq_cls", seed=200, num_labels=3)
    make_peft_task_adapter(tiny_model_dir, root / "t-tag", "token_cls", seed=201, num_labels=5)
    # PEFT keeps no label names; a tagger's must be BIO tags, given beside the adapter as a user would.
    (root / "t-tag" / "loraserve_metadata.json").write_text(json.dumps({"task": {"labels": TAGS}}))
    make_peft_task_adapter(tiny_model_dir, root / "t-qa", "qa", seed=202)
    return root
