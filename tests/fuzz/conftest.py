"""A real server for fuzzing, with small caps everywhere."""

from __future__ import annotations

import pytest
from harness import RunningServer, copy_adapters
from loraserve.server.config import TrainingConfig


@pytest.fixture(scope="module")
def fuzz_server(tiny_model_dir, adapter_sources, task_adapter_sources, tmp_path_factory):
    """Small caps everywhere, so whatever the fuzzer makes valid costs little: 8 new tokens, training jobs
    of at most 2 steps, one job queued."""
    data_root = tmp_path_factory.mktemp("data")
    root = copy_adapters(adapter_sources, tmp_path_factory.mktemp("root"))
    copy_adapters(task_adapter_sources, root, ("t-cls", "t-tag", "t-qa"))
    s = RunningServer(tiny_model_dir, root,
                      max_new_tokens=8, default_max_new_tokens=4, max_lora_rank=16, max_batch_size=8,
                      training=TrainingConfig(data_root=str(data_root), max_steps_per_job=2, max_queued_jobs=1,
                                              max_examples=64, max_tokens_per_job=20_000))
    s.data_root = data_root
    yield s
    s.close()

