"""Per-method request size limits, checked on the raw bytes before a request is parsed.

gRPC's own limit (grpc.max_receive_message_length) is one number for the whole server, and it must
be as large as the largest legitimate request: an inline adapter upload. Without a check per method,
a Predict or GetAdapter call could carry that much and be parsed into Python objects before any
handler sees it. Here each method gets the size its requests need; a larger one is refused with
RESOURCE_EXHAUSTED (what gRPC answers for an oversized message) before protobuf parses it.
"""

from __future__ import annotations

import grpc
from loraserve.core.errors import ResourceExhausted

PACKAGE = "/loraserve.v1."
SMALL_REQUEST_BYTES = 64 * 1024
"""Requests that carry ids, page tokens and flags only."""


def method_limits(max_inference_bytes: int, max_train_bytes: int, max_upload_bytes: int) -> dict[str, int]:
    """Bytes each of our methods accepts; methods not named here take SMALL_REQUEST_BYTES. An upload
    request carries its files plus a little framing (ids, file names), hence the slack."""
    return {
        "InferenceService/Predict": max_inference_bytes,
        "InferenceService/PredictStream": max_inference_bytes,
        "InferenceService/Classify": max_inference_bytes,
        "InferenceService/Tag": max_inference_bytes,
        "InferenceService/Answer": max_inference_bytes,
        "TrainingService/Train": max_train_bytes,
        "AdapterService/LoadAdapter": max_upload_bytes + SMALL_REQUEST_BYTES,
    }


class _Oversized:
    """What the deserializer hands on instead of a parsed request; the handler turns it into a status
    (an exception raised in the deserializer itself would surface as INTERNAL)."""

    __slots__ = ("size",)

    def __init__(self, size: int):
        self.size = size


class RequestSizeLimits(grpc.aio.ServerInterceptor):
    def __init__(self, limits: dict[str, int], default: int = SMALL_REQUEST_BYTES):
        self.limits = limits
        self.default = default

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or not details.method.startswith(PACKAGE):
            return handler  # health and reflection: small, and not ours to bound
        name = details.method[len(PACKAGE):]
        method = name.rsplit("/", 1)[-1]
        limit = self.limits.get(name, self.default)
        parse = handler.request_deserializer

        def deserialize(raw: bytes):
            return _Oversized(len(raw)) if len(raw) > limit else parse(raw)

        def check(request) -> None:
            if isinstance(request, _Oversized):
                raise ResourceExhausted(f"the {method} request has {request.size} bytes, more than the "
                                        f"{limit} bytes this server accepts for {method}")

        if handler.unary_unary:
            inner = handler.unary_unary

            async def unary(request, context):
                check(request)
                return await inner(request, context)

            return grpc.unary_unary_rpc_method_handler(unary, deserialize, handler.response_serializer)
        if handler.unary_stream:
            inner_stream = handler.unary_stream

            async def stream(request, context):
                check(request)
                async for item in inner_stream(request, context):
                    yield item

            return grpc.unary_stream_rpc_method_handler(stream, deserialize, handler.response_serializer)
        return handler
