"""Sending any RPC through a real channel and judging its status; the hypothesis profile of the fuzz tests."""

from __future__ import annotations

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, settings
from loraserve.v1 import adapter_pb2_grpc, inference_pb2_grpc, training_pb2_grpc

# Reproducible in CI (derandomize: the examples follow from the test's code alone), bounded in time.
settings.register_profile(
    "fuzz", derandomize=True, deadline=None, database=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example,
                           HealthCheck.function_scoped_fixture],
)
FORBIDDEN = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN}
CALL_TIMEOUT = 30.0
STREAM_MESSAGES = 3  # a stream is read this far, then cancelled (a Train or Watch stream can last minutes)


def stub_method(srv, service: str, method: str):
    stubs = {"InferenceService": inference_pb2_grpc.InferenceServiceStub,
             "AdapterService": adapter_pb2_grpc.AdapterServiceStub,
             "TrainingService": training_pb2_grpc.TrainingServiceStub}
    return getattr(stubs[service](srv.client.channel), method)


def call(srv, service: str, method: str, request, streaming: bool) -> tuple[grpc.StatusCode, list]:
    """Send one request; a stream is read for a few messages, then cancelled. Returns (code, replies)."""
    fn = stub_method(srv, service, method)
    if not streaming:
        try:
            return grpc.StatusCode.OK, [fn(request, timeout=CALL_TIMEOUT)]
        except grpc.RpcError as e:
            return e.code(), []
    replies = []
    stream = fn(request, timeout=CALL_TIMEOUT)
    try:
        for reply in stream:
            replies.append(reply)
            if len(replies) >= STREAM_MESSAGES:
                stream.cancel()
                return grpc.StatusCode.OK, replies
    except grpc.RpcError as e:
        if e.code() != grpc.StatusCode.CANCELLED or not replies:
            return e.code(), replies
    return stream.code(), replies


def assert_documented(code: grpc.StatusCode, what) -> None:
    assert code not in FORBIDDEN, f"{code.name} for {what!r:.300}"
    assert code != grpc.StatusCode.DEADLINE_EXCEEDED, f"no answer within {CALL_TIMEOUT} s for {what!r:.300}"


def assert_healthy(srv) -> None:
    health = health_pb2_grpc.HealthStub(srv.client.channel)
    assert health.Check(health_pb2.HealthCheckRequest(), timeout=10).status == health_pb2.HealthCheckResponse.SERVING
