"""Protobuf <-> engine types. The only place besides the handlers that touches *_pb2."""

from __future__ import annotations

from loraserve.core.lora.ids import check_id
from loraserve.server.config import EngineConfig
from loraserve.server.engine.types import Finished, SamplingParams, Timings
from loraserve.server.generation import checked_sampling
from loraserve.server.lora.registry import CPU, DISK, GPU, AdapterInfo
from loraserve.server.tasks import Answers, Classification, Tagging
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


def _timings(t: Timings) -> inference_pb2.Timings:
    return inference_pb2.Timings(queue_seconds=t.queue_seconds, first_token_seconds=t.first_token_seconds,
                                 total_seconds=t.total_seconds)


def classify_response(c: Classification) -> inference_pb2.ClassifyResponse:
    return inference_pb2.ClassifyResponse(
        labels=[inference_pb2.LabelScore(label=x.label, probability=x.probability) for x in c.labels],
        predicted=c.predicted, multi_label=c.multi_label, usage=inference_pb2.Usage(prompt_tokens=c.prompt_tokens),
        timings=_timings(c.timings))


def tag_response(t: Tagging) -> inference_pb2.TagResponse:
    return inference_pb2.TagResponse(
        entities=[inference_pb2.Entity(label=e.label, start=e.start, end=e.end, text=e.text, score=e.score)
                  for e in t.entities],
        usage=inference_pb2.Usage(prompt_tokens=t.prompt_tokens), timings=_timings(t.timings))


def answer_response(a: Answers) -> inference_pb2.AnswerResponse:
    return inference_pb2.AnswerResponse(
        answers=[inference_pb2.AnswerSpan(text=x.text, start=x.start, end=x.end, score=x.score) for x in a.answers],
        usage=inference_pb2.Usage(prompt_tokens=a.prompt_tokens), timings=_timings(a.timings))


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
        prompt_rendering=info.rendering,
        labels=info.labels,
    )
