"""InferenceService: Predict and PredictStream on top of the engine."""

from __future__ import annotations

import time

import grpc
from loraserve.server.engine.types import Finished, TextDelta
from loraserve.server import tasks
from loraserve.server.generation import generate
from loraserve.server.service import convert
from loraserve.v1 import inference_pb2, inference_pb2_grpc


class InferenceService(inference_pb2_grpc.InferenceServiceServicer):
    def __init__(self, engine, tokenizer, metrics):
        self.engine = engine
        self.tokenizer = tokenizer
        self.metrics = metrics

    def _events(self, request, context: grpc.aio.ServicerContext):
        return generate(self.engine, self.tokenizer, self.metrics, convert.adapter_id_of(request), request.prompt,
                        convert.messages_of(request), convert.sampling_of(request.sampling, self.engine.config),
                        _deadline(context), raw_prompt=request.raw_prompt)

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

    async def Classify(self, request, context):
        result = await tasks.classify(self.engine, self.tokenizer, self.metrics, convert.adapter_id_of(request),
                                      request.text, request.top_k, _deadline(context))
        return convert.classify_response(result)

    async def Tag(self, request, context):
        result = await tasks.tag(self.engine, self.tokenizer, self.metrics, convert.adapter_id_of(request),
                                 request.text, _deadline(context))
        return convert.tag_response(result)

    async def Answer(self, request, context):
        result = await tasks.answer(self.engine, self.tokenizer, self.metrics, convert.adapter_id_of(request),
                                    request.question, request.context, request.top_k, request.max_answer_tokens,
                                    _deadline(context))
        return convert.answer_response(result)


def _deadline(context: grpc.aio.ServicerContext) -> float | None:
    remaining = context.time_remaining()
    return time.monotonic() + remaining if remaining is not None else None
