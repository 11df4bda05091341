"""The OpenAI-compatible HTTP front: /v1/completions, /v1/chat/completions, /v1/models.

It runs on the gRPC server's event loop and submits to the same engine through server/generation.py,
so HTTP and gRPC requests share batches, limits, metrics and status mapping. `model` names an adapter
id or the base model. Errors are OpenAI's body ({"error": {"message", "type", "param", "code"}}) with
the HTTP status of the matching gRPC code; an error after a stream has started is sent as one last
`data: {"error": ...}` event, since the status line has gone out by then.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import replace
import ssl
from typing import AsyncIterator

from aiohttp import web
from loraserve.core import errors
from loraserve.server.api_keys import ApiKeys
from loraserve.server.engine.types import Finished, TextDelta
from loraserve.server.generation import generate
from loraserve.server.openai_http import bodies
from loraserve.server.openai_http.requests import Call, chat_call, completion_call, model_target
from loraserve.server.service.auth import caller

log = logging.getLogger(__name__)

# (HTTP status, OpenAI error type, gRPC code name for the shared request metrics)
_ERRORS: list[tuple[type, int, str, str]] = [
    (errors.InvalidArgument, 400, "invalid_request_error", "INVALID_ARGUMENT"),
    (errors.FailedPrecondition, 400, "invalid_request_error", "FAILED_PRECONDITION"),
    (errors.NotFound, 404, "not_found_error", "NOT_FOUND"),
    (errors.ResourceExhausted, 429, "rate_limit_error", "RESOURCE_EXHAUSTED"),
    (errors.Unavailable, 503, "service_unavailable", "UNAVAILABLE"),
    (errors.DeadlineExceeded, 504, "timeout", "DEADLINE_EXCEEDED"),
    (errors.Cancelled, 499, "cancelled", "CANCELLED"),
]
_HTTP_CODES = {400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED", 404: "NOT_FOUND",
               405: "UNIMPLEMENTED", 413: "RESOURCE_EXHAUSTED", 415: "INVALID_ARGUMENT"}


class HttpError(Exception):
    def __init__(self, status: int, kind: str, code: str, message: str):
        super().__init__(message)
        self.status, self.kind, self.code = status, kind, code


def as_http_error(e: BaseException) -> HttpError:
    for cls, status, kind, code in _ERRORS:
        if isinstance(e, cls):
            return HttpError(status, kind, code, str(e))
    if isinstance(e, HttpError):
        return e
    if isinstance(e, web.HTTPException):  # aiohttp's own refusals: unknown path, wrong method, body too large
        return HttpError(e.status, "invalid_request_error", _HTTP_CODES.get(e.status, "UNKNOWN"), e.reason)
    log.error("internal error in an HTTP request", exc_info=e)
    return HttpError(500, "internal_error", "INTERNAL", f"internal error ({type(e).__name__}); this is a bug, "
                                                         "please report it")


def error_body(e: HttpError) -> dict:
    return {"error": {"message": str(e), "type": e.kind, "param": None, "code": e.code.lower()}}


class OpenAIFront:
    def __init__(self, engine, tokenizer, metrics, registry, base_name: str, max_body_bytes: int,
                 keys: ApiKeys | None = None):
        self.engine, self.tokenizer, self.metrics, self.registry = engine, tokenizer, metrics, registry
        self.base_name = base_name
        self.keys = keys
        self.app = web.Application(client_max_size=max_body_bytes, middlewares=[self._errors_and_metrics])
        self.app.router.add_post("/v1/completions", self.completions)
        self.app.router.add_post("/v1/chat/completions", self.chat_completions)
        self.app.router.add_get("/v1/models", self.list_models)
        self.app.router.add_get("/v1/models/{model}", self.get_model)
        self.runner: web.AppRunner | None = None

    async def start(self, host: str, port: int, ssl_context: ssl.SSLContext | None = None) -> int:
        # handler_cancellation: a dropped connection cancels its handler, which cancels its engine rows.
        self.runner = web.AppRunner(self.app, handler_cancellation=True, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, host, port, ssl_context=ssl_context)
        await site.start()
        return self.runner.addresses[0][1]

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()

    # --- middleware: auth, errors, metrics ---------------------------------------------------------

    @web.middleware
    async def _errors_and_metrics(self, request: web.Request, handler):
        resource = request.match_info.route.resource  # None for unknown paths: one label for all of them
        method = "openai" + (resource.canonical if resource is not None else "/unknown")
        start, code = time.perf_counter(), "OK"
        try:
            return await handler(request)
        except asyncio.CancelledError:
            code = "CANCELLED"
            raise
        except Exception as e:  # noqa: BLE001 - every error leaves as an OpenAI error body
            err = as_http_error(e)
            code = err.code
            return web.json_response(error_body(err), status=err.status)
        finally:
            self.metrics.observe_rpc(method, code, time.perf_counter() - start)

    def _check(self, request: web.Request, scope: str) -> None:
        """The gRPC port's rules (server/service/auth.py) on HTTP: the same keys, scopes and answers."""
        if self.keys is None:
            return
        scheme, _, key = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise HttpError(401, "authentication_error", "UNAUTHENTICATED",
                            "an API key is required: send the header 'Authorization: Bearer <key>'")
        entry = self.keys.lookup(key.strip())
        if entry is None:
            raise HttpError(401, "authentication_error", "UNAUTHENTICATED", "unknown API key")
        if scope not in entry.scopes:
            raise HttpError(403, "permission_error", "PERMISSION_DENIED",
                            f"API key {entry.name!r} lacks the scope {scope!r} that {request.path} needs")
        caller.set(entry.name)

    async def _body(self, request: web.Request) -> dict:
        try:
            return await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise errors.InvalidArgument(f"the request body is not valid JSON: {e}") from None

    # --- routes -----------------------------------------------------------------------------------

    async def completions(self, request: web.Request) -> web.StreamResponse:
        self._check(request, "inference")
        call = completion_call(await self._body(request), self.base_name, self.engine.config)
        return await self._serve(request, call, chat=False)

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        self._check(request, "inference")
        call = chat_call(await self._body(request), self.base_name, self.engine.config)
        return await self._serve(request, call, chat=True)

    async def list_models(self, request: web.Request) -> web.Response:
        self._check(request, "adapters:read")
        ids = await asyncio.to_thread(self.registry.ids)
        return web.json_response({"object": "list", "data": [self._model(None), *(self._model(i) for i in ids)]})

    async def get_model(self, request: web.Request) -> web.Response:
        self._check(request, "adapters:read")
        adapter_id = model_target(request.match_info["model"], self.base_name)
        if adapter_id is not None:
            await asyncio.to_thread(self.registry.info, adapter_id)  # NotFound for an unknown id
        return web.json_response(self._model(adapter_id))

    def _model(self, adapter_id: str | None) -> dict:
        body = {"id": adapter_id or self.base_name, "object": "model", "created": 0, "owned_by": "loraserve"}
        if adapter_id is not None:
            body["parent"] = self.base_name  # vLLM marks LoRA models the same way
        return body

    # --- generation -------------------------------------------------------------------------------

    def _generators(self, call: Call) -> list[AsyncIterator]:
        prompts = call.prompts or ("",)
        messages = list(call.messages)
        gens = []
        for prompt in prompts:
            for j in range(call.n):
                # n answers to one prompt must differ: a given seed is advanced per choice.
                sampling = call.sampling
                if sampling.seed is not None and j:
                    sampling = replace(sampling, seed=(sampling.seed + j) % 2**64)
                gens.append(generate(self.engine, self.tokenizer, self.metrics, call.adapter_id, prompt, messages,
                                     sampling))
        return gens

    async def _serve(self, request: web.Request, call: Call, chat: bool) -> web.StreamResponse:
        gens = self._generators(call)
        try:
            # The first event of every choice before any byte goes out: refusals (unknown adapter, full
            # queue, bad prompt) still get their own status instead of a broken 200 stream.
            firsts = await _first_events(gens)
            if not call.stream:
                finished = [await _finish(g, first) for g, first in zip(gens, firsts)]
                shape = bodies.chat_completion if chat else bodies.completion
                return web.json_response(shape(bodies.new_id("chatcmpl" if chat else "cmpl"), call.model, finished,
                                               call.n))
            return await self._stream(request, call, chat, gens, firsts)
        finally:
            await asyncio.gather(*(g.aclose() for g in gens), return_exceptions=True)

    async def _stream(self, request, call: Call, chat: bool, gens, firsts) -> web.StreamResponse:
        chunks = bodies.Chunks(chat, call.model, call.include_usage)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(request)

        async def send(body: dict) -> None:
            await response.write(b"data: " + json.dumps(body, ensure_ascii=False).encode() + b"\n\n")

        for i in range(len(gens)):
            if (opening := chunks.role(i)) is not None:
                await send(opening)
        finished: list[Finished | None] = [None] * len(gens)
        try:
            async for i, event in _merge(gens, firsts):
                if isinstance(event, TextDelta):
                    await send(chunks.text(i, event.text))
                else:
                    finished[i] = event
                    await send(chunks.text(i, "", event.reason))
            if call.include_usage:
                await send(chunks.usage(finished, call.n))
        except (ConnectionResetError, asyncio.CancelledError):
            raise  # the client went away: the generators' cleanup cancels the rows
        except Exception as e:  # noqa: BLE001 - the status line is sent; the error travels as an event
            err = as_http_error(e)
            await send(error_body(err))
            self.metrics.observe_rpc("openai-stream-error", err.code, 0.0)
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response


async def _first_events(gens: list[AsyncIterator]) -> list:
    tasks = [asyncio.ensure_future(anext(g)) for g in gens]
    try:
        return await asyncio.gather(*tasks)
    except BaseException:
        # One choice refused: the others are cancelled (their rows freed) before the error is answered.
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


async def _finish(gen: AsyncIterator, event) -> Finished:
    while not isinstance(event, Finished):
        event = await anext(gen)
    return event


async def _merge(gens: list[AsyncIterator], firsts: list) -> AsyncIterator[tuple[int, object]]:
    """Events of several choices as they come, tagged with the choice index; the first event of each
    (already awaited) comes first."""
    if len(gens) == 1:  # the common case needs no tasks
        yield 0, firsts[0]
        if not isinstance(firsts[0], Finished):
            async for event in gens[0]:
                yield 0, event
        return
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(i: int) -> None:
        try:
            if not isinstance(firsts[i], Finished):
                async for event in gens[i]:
                    await queue.put((i, event))
        except Exception as e:  # noqa: BLE001 - handed to the consumer, which fails the stream
            await queue.put((i, e))
        await queue.put((i, done))

    for i, first in enumerate(firsts):
        yield i, first
    tasks = [asyncio.create_task(pump(i)) for i in range(len(gens))]
    try:
        open_ = len(gens)
        while open_:
            i, item = await queue.get()
            if item is done:
                open_ -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
