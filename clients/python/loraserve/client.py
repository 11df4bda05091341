"""A small typed Python client for loraserve.

    from loraserve.client import Client
    with Client("localhost:50051") as c:
        print(c.predict("Hello", adapter_id="my-task", max_new_tokens=32).text)

Over TLS with an API key (add client_cert= and client_key= for a server that requires mutual TLS):

    Client("loraserve.example.com:50051", root_ca="ca.pem", api_key=os.environ["LORASERVE_API_KEY"])
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import grpc

from loraserve import training as train_types
from loraserve.channel import Pem, open_channel, retry_options
from loraserve.training import TrainingEvent, TrainingJob
from loraserve.v1 import (
    adapter_pb2,
    adapter_pb2_grpc,
    inference_pb2,
    inference_pb2_grpc,
    training_pb2,
    training_pb2_grpc,
)

# The adapter files an upload carries: PEFT's two and loraserve's metadata (task heads' labels, rendering).
UPLOADED = ("adapter_config.json", "adapter_model.safetensors", "loraserve_metadata.json")
_FINISH = {inference_pb2.FINISH_REASON_STOP: "stop", inference_pb2.FINISH_REASON_LENGTH: "length"}
_STATE = {adapter_pb2.ADAPTER_STATE_DISK: "disk", adapter_pb2.ADAPTER_STATE_CPU: "cpu",
          adapter_pb2.ADAPTER_STATE_GPU: "gpu"}


@dataclass(frozen=True)
class Completion:
    text: str
    finish_reason: str
    prompt_tokens: int
    generated_tokens: int
    queue_seconds: float
    first_token_seconds: float
    total_seconds: float


@dataclass(frozen=True)
class Chunk:
    """One streamed piece; the last one has finish_reason set and carries the usage."""

    text: str
    finish_reason: str | None = None
    completion: Completion | None = None


@dataclass(frozen=True)
class Adapter:
    adapter_id: str
    state: str
    rank: int
    alpha: float
    target_modules: tuple[str, ...]
    task_type: str
    size_bytes: int
    error: str
    prompt_rendering: str = ""
    """How Predict renders a plain prompt to it: "plain" or "chat" (as its training did)."""
    labels: tuple[str, ...] = ()
    """A task adapter's labels (classes or BIO tags)."""


def _adapter(pb) -> Adapter:
    return Adapter(pb.adapter_id, _STATE.get(pb.state, "unknown"), pb.rank, pb.alpha, tuple(pb.target_modules),
                   pb.task_type, pb.size_bytes, pb.error, pb.prompt_rendering, tuple(pb.labels))


@dataclass(frozen=True)
class Classification:
    """Classify's answer: every label with its probability, most likely first; `predicted` is the decision
    (the top label, or for a multi-label adapter every label at or above its threshold)."""

    labels: list[tuple[str, float]]
    predicted: list[str]
    multi_label: bool
    prompt_tokens: int


@dataclass(frozen=True)
class Entity:
    """A tagged span of the text: text[start:end] (offsets in code points, end exclusive)."""

    label: str
    start: int
    end: int
    text: str
    score: float


@dataclass(frozen=True)
class Answer:
    """An answer span of the context: context[start:end]."""

    text: str
    start: int
    end: int
    score: float


def _completion(text: str, pb) -> Completion:
    return Completion(text, _FINISH.get(pb.finish_reason, "unknown"), pb.usage.prompt_tokens,
                      pb.usage.generated_tokens, pb.timings.queue_seconds, pb.timings.first_token_seconds,
                      pb.timings.total_seconds)


def _route(adapter_id: str) -> tuple[tuple[str, str], ...]:
    """The x-adapter-id header: a proxy in front of several replicas (docs/deployment.md) hashes on it, so
    each adapter's requests land where it is already resident. The server itself reads the request body."""
    # Header values are printable ASCII; an id that is not cannot be routed by, and the server refuses it
    # anyway (INVALID_ARGUMENT): leave the header out rather than fail the call in the client.
    routable = adapter_id and all(" " <= c <= "~" for c in adapter_id)
    return (("x-adapter-id", adapter_id),) if routable else ()


class Client:
    def __init__(self, target: str = "localhost:50051", channel: grpc.Channel | None = None,
                 timeout: float | None = None, max_message_bytes: int = 64 * 1024 * 1024, *, tls: bool = False,
                 root_ca: Pem | None = None, client_cert: Pem | None = None, client_key: Pem | None = None,
                 server_name: str | None = None, api_key: str | None = None, attempts: int = 4):
        """TLS when `tls` or a certificate is given (loraserve.channel.open_channel says how each is
        used); `api_key` goes with every call. `timeout` is every call's deadline in seconds unless the
        call gives its own. Calls that change nothing on the server are tried up to `attempts` times
        when it answers UNAVAILABLE (loraserve.channel.RETRYABLE). A ready `channel` replaces all of these."""
        self.channel = channel or open_channel(
            target, tls=tls, root_ca=root_ca, client_cert=client_cert, client_key=client_key,
            server_name=server_name, api_key=api_key,
            options=[("grpc.max_send_message_length", max_message_bytes),
                     ("grpc.max_receive_message_length", max_message_bytes), *retry_options(attempts)])
        self.timeout = timeout
        self.inference = inference_pb2_grpc.InferenceServiceStub(self.channel)
        self.adapters = adapter_pb2_grpc.AdapterServiceStub(self.channel)
        self.training = training_pb2_grpc.TrainingServiceStub(self.channel)

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.channel.close()

    @staticmethod
    def _request(cls, prompt, messages, adapter_id, max_new_tokens, temperature, top_p, top_k, seed, stop, raw_prompt=False):
        sampling = inference_pb2.SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                                                stop=list(stop))
        if top_p is not None:
            sampling.top_p = top_p
        if seed is not None:
            sampling.seed = seed
        chat = [inference_pb2.ChatMessage(role=m["role"], content=m["content"]) for m in messages or ()]
        return cls(adapter_id=adapter_id or "", prompt=prompt or "", messages=chat, sampling=sampling,
                   raw_prompt=raw_prompt)

    def predict(self, prompt: str | None = None, *, messages: Sequence[dict] | None = None, adapter_id: str = "",
                max_new_tokens: int = 0, temperature: float = 0.0, top_p: float | None = None, top_k: int = 0,
                seed: int | None = None, stop: Sequence[str] = (), timeout: float | None = None,
                raw_prompt: bool = False) -> Completion:
        """A whole completion. A prompt to an adapter is rendered as its training rendered prompts (the
        chat template for adapters trained with it); raw_prompt=True sends the text as is."""
        req = self._request(inference_pb2.PredictRequest, prompt, messages, adapter_id, max_new_tokens, temperature,
                            top_p, top_k, seed, stop, raw_prompt)
        resp = self.inference.Predict(req, timeout=timeout or self.timeout, metadata=_route(adapter_id))
        return _completion(resp.text, resp)

    def stream(self, prompt: str | None = None, *, messages: Sequence[dict] | None = None, adapter_id: str = "",
               max_new_tokens: int = 0, temperature: float = 0.0, top_p: float | None = None, top_k: int = 0,
               seed: int | None = None, stop: Sequence[str] = (), timeout: float | None = None,
               raw_prompt: bool = False) -> Iterator[Chunk]:
        req = self._request(inference_pb2.PredictStreamRequest, prompt, messages, adapter_id, max_new_tokens,
                            temperature, top_p, top_k, seed, stop, raw_prompt)
        text = []
        for resp in self.inference.PredictStream(req, timeout=timeout or self.timeout, metadata=_route(adapter_id)):
            text.append(resp.text_delta)
            if resp.finish_reason:
                done = _completion("".join(text), resp)
                yield Chunk(resp.text_delta, done.finish_reason, done)
            else:
                yield Chunk(resp.text_delta)

    def classify(self, text: str, *, adapter_id: str, top_k: int = 0, timeout: float | None = None) -> Classification:
        """Labels of one text from a sequence-classification adapter."""
        resp = self.inference.Classify(inference_pb2.ClassifyRequest(adapter_id=adapter_id, text=text, top_k=top_k),
                                       timeout=timeout or self.timeout, metadata=_route(adapter_id))
        return Classification([(x.label, x.probability) for x in resp.labels], list(resp.predicted),
                              resp.multi_label, resp.usage.prompt_tokens)

    def tag(self, text: str, *, adapter_id: str, timeout: float | None = None) -> list[Entity]:
        """Entities in one text from an entity-tagging adapter, in text order."""
        resp = self.inference.Tag(inference_pb2.TagRequest(adapter_id=adapter_id, text=text),
                                  timeout=timeout or self.timeout, metadata=_route(adapter_id))
        return [Entity(e.label, e.start, e.end, e.text, e.score) for e in resp.entities]

    def answer(self, question: str, context: str, *, adapter_id: str, top_k: int = 1, max_answer_tokens: int = 0,
               timeout: float | None = None) -> list[Answer]:
        """The best answer spans of the context from an extractive question-answering adapter."""
        req = inference_pb2.AnswerRequest(adapter_id=adapter_id, question=question, context=context, top_k=top_k,
                                          max_answer_tokens=max_answer_tokens)
        resp = self.inference.Answer(req, timeout=timeout or self.timeout, metadata=_route(adapter_id))
        return [Answer(a.text, a.start, a.end, a.score) for a in resp.answers]

    def list_adapters(self, page_size: int = 0) -> list[Adapter]:
        out, token = [], ""
        while True:
            resp = self.adapters.ListAdapters(adapter_pb2.ListAdaptersRequest(page_size=page_size, page_token=token),
                                              timeout=self.timeout)
            out.extend(_adapter(a) for a in resp.adapters)
            token = resp.next_page_token
            if not token:
                return out

    def get_adapter(self, adapter_id: str) -> Adapter:
        return _adapter(self.adapters.GetAdapter(adapter_pb2.GetAdapterRequest(adapter_id=adapter_id),
                                                 timeout=self.timeout).adapter)

    def load_adapter(self, adapter_id: str, *, path: str | None = None, upload_dir: str | Path | None = None,
                     overwrite: bool = False) -> Adapter:
        """Load <root>/<adapter_id>, or register `path` (under the server's root), or upload a local dir."""
        req = adapter_pb2.LoadAdapterRequest(adapter_id=adapter_id, overwrite=overwrite)
        if path is not None:
            req.path = path
        if upload_dir is not None:
            files = {p.name: p.read_bytes() for p in Path(upload_dir).iterdir()
                     if p.name in UPLOADED}
            req.upload.files.update(files)
        return _adapter(self.adapters.LoadAdapter(req, timeout=self.timeout).adapter)

    def unload_adapter(self, adapter_id: str) -> Adapter:
        return _adapter(self.adapters.UnloadAdapter(adapter_pb2.UnloadAdapterRequest(adapter_id=adapter_id),
                                                    timeout=self.timeout).adapter)

    def delete_adapter(self, adapter_id: str) -> None:
        self.adapters.DeleteAdapter(adapter_pb2.DeleteAdapterRequest(adapter_id=adapter_id), timeout=self.timeout)

    # --- training -------------------------------------------------------------------------------

    def train(self, adapter_id: str, *, examples: Iterable[dict] | None = None, dataset_path: str | None = None,
              settings: dict | None = None, overwrite: bool = False, truncate: bool = False,
              timeout: float | None = None) -> Iterator[TrainingEvent]:
        """Start a job and follow its events to the end; a refused request raises grpc.RpcError at the
        first event. Stopping the iteration detaches: the job keeps training (watch_training_job
        re-attaches)."""
        request = train_types.train_request(adapter_id, examples, dataset_path, settings, overwrite, truncate)
        return self._events(self.training.Train(request, timeout=timeout or self.timeout))

    def watch_training_job(self, job_id: str, timeout: float | None = None) -> Iterator[TrainingEvent]:
        """The job's events so far, then the live ones until it ends."""
        request = training_pb2.WatchTrainingJobRequest(job_id=job_id)
        return self._events(self.training.WatchTrainingJob(request, timeout=timeout or self.timeout))

    @staticmethod
    def _events(call) -> Iterator[TrainingEvent]:
        try:
            for response in call:
                yield train_types.event_of(response.event)
        finally:
            call.cancel()  # a caller that stops early closes the stream now, not at garbage collection

    def get_training_job(self, job_id: str) -> TrainingJob:
        return train_types.job_of(self.training.GetTrainingJob(training_pb2.GetTrainingJobRequest(job_id=job_id),
                                                            timeout=self.timeout).job)

    def list_training_jobs(self, state: str | None = None, page_size: int = 0) -> list[TrainingJob]:
        """Every job, oldest first; `state` keeps one of queued, running, succeeded, failed, cancelled."""
        states = {name: value for value, name in train_types.STATES.items()}
        if state is not None and state not in states:
            raise ValueError(f"state must be one of {', '.join(states)}, got {state!r}")
        out, token = [], ""
        while True:
            request = training_pb2.ListTrainingJobsRequest(page_size=page_size, page_token=token,
                                                           state=states.get(state, 0))
            resp = self.training.ListTrainingJobs(request, timeout=self.timeout)
            out.extend(train_types.job_of(j) for j in resp.jobs)
            token = resp.next_page_token
            if not token:
                return out

    def cancel_training_job(self, job_id: str, timeout: float | None = None) -> TrainingJob:
        """Cancel and wait until the job has stopped; returns it as it ended."""
        request = training_pb2.CancelTrainingJobRequest(job_id=job_id)
        return train_types.job_of(self.training.CancelTrainingJob(request, timeout=timeout or self.timeout).job)
