"""InferenceService: Predict and PredictStream on top of the engine."""

from __future__ import annotations

import time

import grpc
from loraserve.server.engine.types import Finished, TextDelta
from loraserve.server.generation import generate
from loraserve.server.service import convert
from loraserve.v1 import inference_pb2, inference_pb2_grpc


class InferenceService(inference_pb2_grpc.InferenceServiceServicer):
    def __init__(self, engine, tokenizer, metrics):
        self.engine = engine
        self.tokenizer = tokenizer
        self.metrics = metrics

    def _events(self, request, context: grpc.aio.ServicerContext):
        remaining = context.time_remaining()
        deadline = time.monotonic() + remaining if remaining is not None else None
        return generate(self.engine, self.tokenizer, self.metrics, convert.adapter_id_of(request), request.prompt,
                        convert.messages_of(request), convert.sampling_of(request.sampling, self.engine.config),
                        deadline, raw_prompt=request.raw_prompt)

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
