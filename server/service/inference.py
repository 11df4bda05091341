"""InferenceService: Predict and PredictStream on top of the engine."""

from __future__ import annotations

import asyncio
import time
import uuid

import grpc
from loraserve.core.errors import Cancelled, DeadlineExceeded
from loraserve.core.prompt import render
from loraserve.server.engine.types import Failed, Finished, GenerationRequest, TextDelta
from loraserve.server.service import convert
from loraserve.v1 import inference_pb2, inference_pb2_grpc


class InferenceService(inference_pb2_grpc.InferenceServiceServicer):
    def __init__(self, engine, tokenizer, metrics):
        self.engine = engine
        self.tokenizer = tokenizer
        self.metrics = metrics

    async def _events(self, request, context: grpc.aio.ServicerContext):
        """Submit the request and yield its engine events; cancel it if the caller goes away."""
        adapter_id = convert.adapter_id_of(request)
        sampling = convert.sampling_of(request.sampling, self.engine.config)
        ids = await asyncio.to_thread(render, self.tokenizer, request.prompt, convert.messages_of(request),
                                      self.engine.max_prompt_tokens)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        def emit(event):
            try:
                loop.call_soon_threadsafe(queue.put_nowait, event)
            except RuntimeError:  # the event loop is gone (server stopped): nobody is listening
                pass

        remaining = context.time_remaining()
        deadline = time.monotonic() + remaining if remaining is not None else None
        gen = GenerationRequest(uuid.uuid4().hex, adapter_id, ids, sampling, emit, deadline)
        self.engine.submit(gen)
        self.metrics.observe_adapter_request(adapter_id or "")
        finished = False
        try:
            while True:
                event = await queue.get()
                if isinstance(event, Failed):
                    finished = True
                    raise event.error
                if isinstance(event, Finished):
                    finished = True
                    if event.reason == "deadline":
                        raise DeadlineExceeded("the request's deadline passed before generation finished")
                    if event.reason == "cancelled":
                        raise Cancelled("the request was cancelled")
                yield event
                if isinstance(event, Finished):
                    return
        finally:
            if not finished:  # client cancelled or deadline hit on the gRPC side: free the row now
                self.engine.cancel(gen.request_id)

    async def Predict(self, request, context):
        async for event in self._events(request, context):
            if isinstance(event, Finished):
                return convert.predict_response(event)

    async def PredictStream(self, request, context):
        async for event in self._events(request, context):
            if isinstance(event, TextDelta):
                yield inference_pb2.PredictStreamResponse(text_delta=event.text)
            else:
                yield convert.stream_final(event)
