"""Engine results -> OpenAI response bodies and stream chunks (plain dicts; the front serializes them)."""

from __future__ import annotations

import time
import uuid

from loraserve.server.engine.types import Finished


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def usage(finished: list[Finished], n: int) -> dict:
    """OpenAI counts each prompt once however many choices (n) answer it; choices come prompt by prompt."""
    prompt_tokens = sum(f.prompt_tokens for f in finished[::n])
    completion = sum(f.generated_tokens for f in finished)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion, "total_tokens": prompt_tokens + completion}


def completion(call_id: str, model: str, finished: list[Finished], n: int) -> dict:
    return {
        "id": call_id, "object": "text_completion", "created": int(time.time()), "model": model,
        "choices": [{"index": i, "text": f.text, "finish_reason": f.reason, "logprobs": None}
                    for i, f in enumerate(finished)],
        "usage": usage(finished, n),
    }


def chat_completion(call_id: str, model: str, finished: list[Finished], n: int) -> dict:
    return {
        "id": call_id, "object": "chat.completion", "created": int(time.time()), "model": model,
        "choices": [{"index": i, "message": {"role": "assistant", "content": f.text}, "finish_reason": f.reason,
                     "logprobs": None} for i, f in enumerate(finished)],
        "usage": usage(finished, n),
    }


class Chunks:
    """The stream chunks of one call, in the shape of its kind (chat or completions)."""

    def __init__(self, chat: bool, model: str, include_usage: bool):
        self.chat = chat
        self.id = new_id("chatcmpl" if chat else "cmpl")
        self.object = "chat.completion.chunk" if chat else "text_completion"
        self.model = model
        self.created = int(time.time())
        self.include_usage = include_usage

    def _chunk(self, choices: list[dict], usage_body: dict | None = None) -> dict:
        body = {"id": self.id, "object": self.object, "created": self.created, "model": self.model,
                "choices": choices}
        if self.include_usage:
            body["usage"] = usage_body  # null on every chunk but the last, as OpenAI sends it
        return body

    def role(self, index: int) -> dict | None:
        """Chat streams open each choice with the assistant role."""
        if not self.chat:
            return None
        return self._chunk([{"index": index, "delta": {"role": "assistant", "content": ""}, "finish_reason": None,
                             "logprobs": None}])

    def text(self, index: int, text: str, finish_reason: str | None = None) -> dict:
        if self.chat:
            delta = {"content": text} if text else {}
            choice = {"index": index, "delta": delta, "finish_reason": finish_reason, "logprobs": None}
        else:
            choice = {"index": index, "text": text, "finish_reason": finish_reason, "logprobs": None}
        return self._chunk([choice])

    def usage(self, finished: list[Finished], n: int) -> dict:
        return self._chunk([], usage(finished, n))
