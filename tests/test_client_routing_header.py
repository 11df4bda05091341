"""The Python client names the adapter in the x-adapter-id header that replicas are routed by."""

from __future__ import annotations

import shutil

import grpc
import pytest
from harness import RunningServer


class Recorder(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):
    def __init__(self):
        self.seen: list[tuple[str, dict]] = []

    def _record(self, details):
        self.seen.append((details.method.rsplit("/", 1)[-1], dict(details.metadata or ())))

    def intercept_unary_unary(self, continuation, details, request):
        self._record(details)
        return continuation(details, request)

    def intercept_unary_stream(self, continuation, details, request):
        self._record(details)
        return continuation(details, request)


def test_predict_and_stream_carry_the_adapter_header(tiny_model_dir, adapter_sources, tmp_path):
    from loraserve.client import Client

    shutil.copytree(adapter_sources / "a0", tmp_path / "a0")
    srv = RunningServer(tiny_model_dir, tmp_path)
    recorder = Recorder()
    try:
        with Client(channel=grpc.intercept_channel(grpc.insecure_channel(srv.target), recorder)) as c:
            c.predict("Hi", adapter_id="a0", max_new_tokens=1)
            list(c.stream("Hi", adapter_id="a0", max_new_tokens=1))
            c.predict("Hi", max_new_tokens=1)
            with pytest.raises(grpc.RpcError) as e:  # not a header value: the server still answers for it
                c.predict("Hi", adapter_id="a0\n", max_new_tokens=1)
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    finally:
        srv.close()
    assert [(m, md.get("x-adapter-id")) for m, md in recorder.seen] == [
        ("Predict", "a0"), ("PredictStream", "a0"), ("Predict", None), ("Predict", None)]
