"""The Auth interceptor on a bare gRPC server: methods without a scope are refused to every key (fail
closed), whatever their call shape, and handlers see the caller's key name."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from dial import bearer
from loraserve.server.api_keys import ApiKeys, key_line, parse_scopes
from loraserve.server.service.auth import METHOD_SCOPES, Auth, caller
from loraserve.v1 import adapter_pb2, inference_pb2, training_pb2

ADMIN = "lsk_admin-key-for-the-interceptor-test"


async def whoami(request: bytes, context) -> bytes:
    return (caller.get() or "").encode()


async def echo_stream(requests, context):
    async for request in requests:
        yield request


async def exchange(keys_file, calls):
    """Serve a mapped method (Predict) and two unmapped ones of our package; returns each call's outcome."""
    server = grpc.aio.server(interceptors=[Auth(ApiKeys(str(keys_file), None))])
    server.add_generic_rpc_handlers([
        grpc.method_handlers_generic_handler("loraserve.v1.InferenceService", {
            "Predict": grpc.unary_unary_rpc_method_handler(whoami)}),
        grpc.method_handlers_generic_handler("loraserve.v1.AdapterService", {
            "Backdoor": grpc.unary_unary_rpc_method_handler(whoami),
            "Chat": grpc.stream_stream_rpc_method_handler(echo_stream)}),
    ])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    outcomes = []
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            for method, streaming in calls:
                try:
                    if streaming:
                        outcomes.append([r async for r in ch.stream_stream(method)(iter([b"x"]), metadata=bearer(ADMIN))])
                    else:
                        outcomes.append(await ch.unary_unary(method)(b"", metadata=bearer(ADMIN), timeout=10))
                except grpc.aio.AioRpcError as e:
                    outcomes.append((e.code(), e.details()))
    finally:
        await server.stop(0)
    return outcomes


def test_unmapped_methods_are_refused_and_handlers_see_the_caller(tmp_path):
    keys_file = tmp_path / "keys"
    keys_file.write_text(key_line(ADMIN, "admin", parse_scopes("*")) + "\n")
    predict, backdoor, chat = asyncio.run(exchange(keys_file, [
        ("/loraserve.v1.InferenceService/Predict", False),
        ("/loraserve.v1.AdapterService/Backdoor", False),
        ("/loraserve.v1.AdapterService/Chat", True),
    ]))
    assert predict == b"admin"
    for outcome in (backdoor, chat):
        assert outcome[0] == grpc.StatusCode.PERMISSION_DENIED and "not open to any API key scope" in outcome[1]


@pytest.mark.parametrize("module,service", [(inference_pb2, "InferenceService"), (adapter_pb2, "AdapterService"),
                                            (training_pb2, "TrainingService")])
def test_every_method_of_our_services_has_a_scope(module, service):
    descriptor = module.DESCRIPTOR.services_by_name[service]
    methods = {f"/{descriptor.full_name}/{m.name}" for m in descriptor.methods}
    ours = {m for m in METHOD_SCOPES if m.startswith(f"/{descriptor.full_name}/")}
    assert methods == ours
