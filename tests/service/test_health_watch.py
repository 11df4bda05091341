"""grpc.health.v1 Health/Watch through the server's interceptors: it streams with context.write()
(a coroutine, not an async generator), which the metrics interceptor answered with INTERNAL."""

from __future__ import annotations

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from harness import RunningServer, copy_adapters


def test_health_watch_streams_serving(tiny_model_dir, adapter_sources, tmp_path):
    s = RunningServer(tiny_model_dir, copy_adapters(adapter_sources, tmp_path / "root", ("a0",)))
    try:
        watch = health_pb2_grpc.HealthStub(s.client.channel).Watch(health_pb2.HealthCheckRequest(), timeout=2)
        statuses, code = [], grpc.StatusCode.OK
        try:
            for reply in watch:
                statuses.append(reply.status)
        except grpc.RpcError as e:
            code = e.code()
        assert statuses[:1] == [health_pb2.HealthCheckResponse.SERVING]
        assert code == grpc.StatusCode.DEADLINE_EXCEEDED  # a watch lasts until the caller leaves
    finally:
        s.close()
