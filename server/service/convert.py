"""Protobuf <-> engine types. The only place besides the handlers that touches *_pb2."""

from __future__ import annotations

from loraserve.core.lora.ids import check_id
from loraserve.server.config import EngineConfig
from loraserve.server.engine.types import Finished, SamplingParams
from loraserve.server.generation import checked_sampling
from loraserve.server.lora.registry import CPU, DISK, GPU, AdapterInfo
from loraserve.v1 import adapter_pb2, inference_pb2

_FINISH = {"stop": inference_pb2.FINISH_REASON_STOP, "length": inference_pb2.FINISH_REASON_LENGTH}
_STATE = {DISK: adapter_pb2.ADAPTER_STATE_DISK, CPU: adapter_pb2.ADAPTER_STATE_CPU,
          GPU: adapter_pb2.ADAPTER_STATE_GPU}


def adapter_id_of(request) -> str | None:
    return check_id(request.adapter_id) if request.adapter_id else None


def messages_of(request) -> list[tuple[str, str]]:
    return [(m.role, m.content) for m in request.messages]


def sampling_of(pb: inference_pb2.SamplingParams, config: EngineConfig) -> SamplingParams:
    return checked_sampling(config, max_new_tokens=pb.max_new_tokens, temperature=pb.temperature,
                            top_p=pb.top_p if pb.HasField("top_p") else 1.0, top_k=pb.top_k,
                            seed=pb.seed if pb.HasField("seed") else None, stop=list(pb.stop))


def usage_and_timings(done: Finished) -> tuple[inference_pb2.Usage, inference_pb2.Timings]:
    t = done.timings
    return (
        inference_pb2.Usage(prompt_tokens=done.prompt_tokens, generated_tokens=done.generated_tokens),
        inference_pb2.Timings(queue_seconds=t.queue_seconds, first_token_seconds=t.first_token_seconds,
                              total_seconds=t.total_seconds),
    )


def predict_response(done: Finished) -> inference_pb2.PredictResponse:
    usage, timings = usage_and_timings(done)
    return inference_pb2.PredictResponse(text=done.text, finish_reason=_FINISH[done.reason], usage=usage,
                                         timings=timings)


def stream_final(done: Finished, tail: str = "") -> inference_pb2.PredictStreamResponse:
    usage, timings = usage_and_timings(done)
    return inference_pb2.PredictStreamResponse(text_delta=tail, finish_reason=_FINISH[done.reason], usage=usage,
                                               timings=timings)


def adapter_pb(info: AdapterInfo) -> adapter_pb2.Adapter:
    return adapter_pb2.Adapter(
        adapter_id=info.adapter_id,
        state=_STATE[info.state],
        rank=info.rank,
        alpha=info.alpha,
        target_modules=info.target_modules,
        task_type=info.task_type,
        size_bytes=info.size_bytes,
        error=info.error or "",
    )
