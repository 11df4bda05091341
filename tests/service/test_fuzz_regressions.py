"""Inputs the fuzz tests (tests/fuzz) found answered with INTERNAL, each pinned with its documented status."""

from __future__ import annotations

import grpc
import pytest
from harness import RunningServer, copy_adapters
from loraserve.server.config import TrainingConfig
from loraserve.v1 import adapter_pb2, training_pb2


@pytest.fixture(scope="module")
def srv(tiny_model_dir, adapter_sources, tmp_path_factory):
    s = RunningServer(tiny_model_dir, copy_adapters(adapter_sources, tmp_path_factory.mktemp("root")),
                      training=TrainingConfig(data_root=str(tmp_path_factory.mktemp("data"))))
    yield s
    s.close()


def code_of(fn, request) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as e:
        fn(request, timeout=30)
    return e.value.code()


@pytest.mark.parametrize("path", ["\x00", "a0\x00", "x" * 300, "a0/" + "y" * 4000])
def test_load_adapter_paths_the_filesystem_refuses_are_invalid_argument(srv, path):
    # NUL raised ValueError and a name over 255 bytes OSError(ENAMETOOLONG): both came back INTERNAL.
    request = adapter_pb2.LoadAdapterRequest(adapter_id="fz", path=path)
    assert code_of(srv.client.adapters.LoadAdapter, request) == grpc.StatusCode.INVALID_ARGUMENT
    assert srv.client.predict("hi", adapter_id="a0", max_new_tokens=2).generated_tokens == 2


def test_a_dataset_line_nested_too_deeply_is_invalid_argument(srv):
    # json's decoder recurses once per level: RecursionError, answered INTERNAL.
    data_root = srv.config.training.data_root
    with open(f"{data_root}/deep.jsonl", "w") as f:
        f.write('{"prompt": "a", "completion": "b"}\n' + "[" * 100_000 + "\n")
    request = training_pb2.TrainRequest(adapter_id="deep", dataset_path="deep.jsonl")
    with pytest.raises(grpc.RpcError) as e:
        list(srv.client.training.Train(request, timeout=30))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "line 2" in e.value.details()
