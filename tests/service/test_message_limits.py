"""Each method accepts the request size it needs: an upload may be large, a Predict or a GetAdapter may
not borrow the upload's limit. Oversized requests are refused by size before they are parsed."""

from __future__ import annotations

import grpc
import pytest
from harness import RunningServer
from loraserve.v1 import adapter_pb2, inference_pb2

KIB = 1024


@pytest.fixture(scope="module")
def server(tiny_model_dir, adapter_sources, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    s = RunningServer(tiny_model_dir, root, max_inference_request_bytes=32 * KIB)
    yield s
    s.close()


def _code(call) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as e:
        call()
    return e.value.code(), e.value.details()


def test_predict_over_its_limit_is_refused_before_parsing(server):
    big = inference_pb2.PredictRequest(prompt="x" * (40 * KIB))
    code, details = _code(lambda: server.client.inference.Predict(big, timeout=30))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "Predict" in details and str(32 * KIB) in details
    code, _ = _code(lambda: list(server.client.inference.PredictStream(
        inference_pb2.PredictStreamRequest(prompt="x" * (40 * KIB)), timeout=30)))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert server.metric("loraserve_requests_total", method="Predict", code="RESOURCE_EXHAUSTED") == 1
    assert server.metric("loraserve_requests_total", method="PredictStream", code="RESOURCE_EXHAUSTED") == 1


def test_small_methods_take_small_requests(server):
    code, details = _code(lambda: server.client.adapters.GetAdapter(
        adapter_pb2.GetAdapterRequest(adapter_id="a" * (100 * KIB)), timeout=30))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "GetAdapter" in details


def test_an_upload_larger_than_predicts_limit_loads(server, adapter_sources):
    source = adapter_sources / "a2"
    assert (source / "adapter_model.safetensors").stat().st_size > 32 * KIB
    assert server.client.load_adapter("uploaded", upload_dir=source).adapter_id == "uploaded"
    assert server.client.predict("Hello", adapter_id="uploaded", max_new_tokens=2).generated_tokens >= 1


def test_requests_within_limits_still_work(server):
    assert server.client.predict("y" * 1000, max_new_tokens=1).generated_tokens == 1
