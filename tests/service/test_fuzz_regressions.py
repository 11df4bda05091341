"""Inputs the fuzz tests (tests/fuzz) found answered with INTERNAL, each pinned with its documented status."""

from __future__ import annotations

import grpc
import pytest
from harness import RunningServer, copy_adapters
from loraserve.v1 import adapter_pb2


@pytest.fixture(scope="module")
def srv(tiny_model_dir, adapter_sources, tmp_path_factory):
    s = RunningServer(tiny_model_dir, copy_adapters(adapter_sources, tmp_path_factory.mktemp("root")))
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
