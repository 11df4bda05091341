"""The Python client retries calls that change nothing on the server when it answers UNAVAILABLE (a
replica draining), and never retries calls whose effect a retry could repeat. The server here is a
small gRPC servicer that refuses its first calls, the point being the client's wire behaviour."""

from __future__ import annotations

from concurrent import futures

import grpc
import pytest
from loraserve.client import Client
from loraserve.v1 import adapter_pb2, adapter_pb2_grpc, inference_pb2, inference_pb2_grpc


class Refusing(inference_pb2_grpc.InferenceServiceServicer, adapter_pb2_grpc.AdapterServiceServicer):
    def __init__(self, refusals: int):
        self.refusals = refusals
        self.calls: dict[str, int] = {}

    def _refuse(self, name, context) -> None:
        self.calls[name] = self.calls.get(name, 0) + 1
        if self.calls[name] <= self.refusals:
            context.abort(grpc.StatusCode.UNAVAILABLE, "draining")

    def Predict(self, request, context):
        self._refuse("Predict", context)
        return inference_pb2.PredictResponse(text="ok", finish_reason=inference_pb2.FINISH_REASON_STOP)

    def PredictStream(self, request, context):
        self._refuse("PredictStream", context)
        yield inference_pb2.PredictStreamResponse(text_delta="ok", finish_reason=inference_pb2.FINISH_REASON_STOP)

    def DeleteAdapter(self, request, context):
        self._refuse("DeleteAdapter", context)
        return adapter_pb2.DeleteAdapterResponse()


@pytest.fixture
def refusing():
    servicer = Refusing(refusals=2)
    server = grpc.server(futures.ThreadPoolExecutor(4))
    inference_pb2_grpc.add_InferenceServiceServicer_to_server(servicer, server)
    adapter_pb2_grpc.add_AdapterServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield servicer, f"127.0.0.1:{port}"
    server.stop(0)


def test_reads_and_generation_are_retried_on_unavailable(refusing):
    servicer, target = refusing
    with Client(target, timeout=30) as c:
        assert c.predict("hi").text == "ok"
        assert [ch.text for ch in c.stream("hi")] == ["ok"]
        with pytest.raises(grpc.RpcError) as e:
            c.delete_adapter("a0")
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    assert servicer.calls == {"Predict": 3, "PredictStream": 3, "DeleteAdapter": 1}


def test_attempts_one_turns_retries_off(refusing):
    servicer, target = refusing
    with Client(target, timeout=30, attempts=1) as c, pytest.raises(grpc.RpcError) as e:
        c.predict("hi")
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE and servicer.calls == {"Predict": 1}
