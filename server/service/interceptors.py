"""One interceptor for every RPC: engine errors -> gRPC status codes, RPC timing and counts."""

from __future__ import annotations

import asyncio
import inspect
import logging
import time

import grpc
from loraserve.core import errors
from loraserve.server.service.deadlines import cancel_code
from loraserve.trainer.loop import TrainingFailed

log = logging.getLogger(__name__)

STATUS = {
    errors.NotFound: grpc.StatusCode.NOT_FOUND,
    errors.InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    errors.FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    errors.AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    errors.ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.Unavailable: grpc.StatusCode.UNAVAILABLE,
    errors.Cancelled: grpc.StatusCode.CANCELLED,
    errors.DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
    # A diverged run (NaN loss): the request was valid, this attempt failed; other settings may not.
    TrainingFailed: grpc.StatusCode.ABORTED,
}


def status_of(e: BaseException) -> grpc.StatusCode:
    for cls, code in STATUS.items():
        if isinstance(e, cls):
            return code
    return grpc.StatusCode.INTERNAL


async def _abort(e: Exception, context) -> None:
    """Turn an exception into the RPC's status; raises grpc.aio.AbortError as context.abort does."""
    code = status_of(e)
    if code == grpc.StatusCode.INTERNAL:
        log.error("internal error in RPC", exc_info=e)
        message = f"internal error ({type(e).__name__}); this is a bug, please report it"
    else:
        message = str(e)
    await context.abort(code, message)


class ErrorsAndMetrics(grpc.aio.ServerInterceptor):
    def __init__(self, metrics):
        self.metrics = metrics

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or not (handler.unary_unary or handler.unary_stream):
            return handler
        method = details.method.rsplit("/", 1)[-1]
        if handler.unary_unary:
            inner = handler.unary_unary

            async def unary(request, context):
                start, code = time.perf_counter(), grpc.StatusCode.OK
                try:
                    return await inner(request, context)
                except asyncio.CancelledError:
                    code = cancel_code(context)
                    raise
                except grpc.aio.AbortError:
                    code = context.code() or grpc.StatusCode.UNKNOWN
                    raise
                except Exception as e:  # noqa: BLE001 - every error leaves as a status code
                    code = status_of(e)
                    await _abort(e, context)
                finally:
                    self.metrics.observe_rpc(method, code.name, time.perf_counter() - start)

            return grpc.unary_unary_rpc_method_handler(unary, handler.request_deserializer,
                                                       handler.response_serializer)
        inner_stream = handler.unary_stream

        async def stream(request, context):
            start, code = time.perf_counter(), grpc.StatusCode.OK
            try:
                result = inner_stream(request, context)
                if inspect.isasyncgen(result):
                    async for item in result:
                        yield item
                else:  # a handler that streams with context.write() (grpc health's Watch) returns a coroutine
                    await result
            except asyncio.CancelledError:
                code = cancel_code(context)
                raise
            except grpc.aio.AbortError:
                code = context.code() or grpc.StatusCode.UNKNOWN
                raise
            except Exception as e:  # noqa: BLE001
                code = status_of(e)
                await _abort(e, context)
            finally:
                self.metrics.observe_rpc(method, code.name, time.perf_counter() - start)

        return grpc.unary_stream_rpc_method_handler(stream, handler.request_deserializer, handler.response_serializer)
