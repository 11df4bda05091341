"""API-key authorization of every RPC: the key from `authorization: Bearer <key>`, the scope per method.

Health and reflection stay open (probes and tooling carry no key). Every other method needs the scope
METHOD_SCOPES gives it; a method missing there is refused whatever the key, so an RPC added to a
proto stays closed until someone decides its scope. The interceptor sits inside ErrorsAndMetrics,
so refused calls are counted in loraserve_requests_total with their code.
"""

from __future__ import annotations

import logging
from contextvars import ContextVar
from functools import partial
from typing import Awaitable, Callable

import grpc
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection
from loraserve.server.api_keys import ApiKeys
from loraserve.v1 import adapter_pb2, inference_pb2, training_pb2

log = logging.getLogger(__name__)

caller: ContextVar[str | None] = ContextVar("caller", default=None)
"""Name of the key the current RPC authenticated with; None when the server runs without keys. Each
RPC runs in its own task, so the value is the RPC's own (limits per key read it)."""

_SCOPE_OF_SERVICE_METHOD = {
    (inference_pb2, "InferenceService"): {"Predict": "inference", "PredictStream": "inference", "Classify": "inference",
                                          "Tag": "inference", "Answer": "inference"},
    (adapter_pb2, "AdapterService"): {"ListAdapters": "adapters:read", "GetAdapter": "adapters:read",
                                      "LoadAdapter": "adapters:write", "UnloadAdapter": "adapters:write",
                                      "DeleteAdapter": "adapters:write"},
    (training_pb2, "TrainingService"): {"Train": "training", "CancelTrainingJob": "training",
                                        "WatchTrainingJob": "training", "GetTrainingJob": "training",
                                        "ListTrainingJobs": "training"},
}
METHOD_SCOPES: dict[str, str] = {
    f"/{module.DESCRIPTOR.services_by_name[service].full_name}/{method}": scope
    for (module, service), methods in _SCOPE_OF_SERVICE_METHOD.items() for method, scope in methods.items()
}
"""Full method path -> the scope a key needs to call it."""
OPEN_SERVICES = frozenset({health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME})

Authorize = Callable[[grpc.aio.ServicerContext], Awaitable[None]]


class Auth(grpc.aio.ServerInterceptor):
    def __init__(self, keys: ApiKeys):
        self.keys = keys

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or details.method.split("/")[1] in OPEN_SERVICES:
            return handler
        return _guarded(handler, partial(self._authorize, details.method))

    async def _authorize(self, method: str, context: grpc.aio.ServicerContext) -> None:
        """Sets `caller`, or aborts the RPC when the key is missing, unknown or lacks the method's scope."""
        values = [v for k, v in context.invocation_metadata() or () if k == "authorization"]
        if not values:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED,
                                "an API key is required: send metadata 'authorization: Bearer <key>'")
        scheme, _, key = values[0].partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "the authorization metadata must be 'Bearer <key>'")
        entry = self.keys.lookup(key.strip())
        if entry is None:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "unknown API key")
        scope = METHOD_SCOPES.get(method)
        if scope is None:
            log.warning("refused %s: no scope is mapped to it (server/service/auth.py METHOD_SCOPES)", method)
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, f"{method} is not open to any API key scope")
        if scope not in entry.scopes:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED,
                                f"API key {entry.name!r} lacks the scope {scope!r} that {method} needs")
        caller.set(entry.name)


def _guarded(handler: grpc.RpcMethodHandler, authorize: Authorize) -> grpc.RpcMethodHandler:
    """The same handler, authorizing first; all four call shapes, so none slips through unchecked."""
    serializers = handler.request_deserializer, handler.response_serializer
    if handler.unary_unary:
        unary_unary = handler.unary_unary

        async def guarded_unary_unary(request, context):
            await authorize(context)
            return await unary_unary(request, context)

        return grpc.unary_unary_rpc_method_handler(guarded_unary_unary, *serializers)
    if handler.unary_stream:
        unary_stream = handler.unary_stream

        async def guarded_unary_stream(request, context):
            await authorize(context)
            async for response in unary_stream(request, context):
                yield response

        return grpc.unary_stream_rpc_method_handler(guarded_unary_stream, *serializers)
    if handler.stream_unary:
        stream_unary = handler.stream_unary

        async def guarded_stream_unary(requests, context):
            await authorize(context)
            return await stream_unary(requests, context)

        return grpc.stream_unary_rpc_method_handler(guarded_stream_unary, *serializers)
    stream_stream = handler.stream_stream

    async def guarded_stream_stream(requests, context):
        await authorize(context)
        async for response in stream_stream(requests, context):
            yield response

    return grpc.stream_stream_rpc_method_handler(guarded_stream_stream, *serializers)
