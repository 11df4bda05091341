"""OpenAI request bodies -> checked, JSON-free calls.

Fields follow OpenAI's API reference for /v1/completions and /v1/chat/completions. A field the server
cannot honour (logprobs, tools, penalties, echo, suffix, a non-text response format) is refused with
400 naming it rather than silently ignored: a client that asks for it would otherwise get a different
answer than it expects. Informational fields (user, metadata, store) are accepted and ignored.
"""

from __future__ import annotations

from dataclasses import dataclass

from loraserve.core.errors import InvalidArgument
from loraserve.core.lora.ids import check_id
from loraserve.server.config import EngineConfig
from loraserve.server.engine.types import SamplingParams
from loraserve.server.generation import checked_sampling

MAX_CHOICES = 16
"""Prompts x n in one call: each choice takes a batch row, so one call may not take them all."""
COMPLETIONS_MAX_TOKENS = 16
"""OpenAI's default max_tokens for /v1/completions (chat completions default to the server's)."""
_UNSUPPORTED_IF_SET = {
    # field: the value that means "not asked for"
    "logprobs": (None, False, 0),
    "top_logprobs": (None, 0),
    "echo": (None, False),
    "suffix": (None, ""),
    "presence_penalty": (None, 0, 0.0),
    "frequency_penalty": (None, 0, 0.0),
    "logit_bias": (None, {}),
    "tools": (None, []),
    "tool_choice": (None, "none"),
    "functions": (None, []),
    "function_call": (None, "none"),
    "audio": (None,),
    "prediction": (None,),
}


@dataclass(frozen=True)
class Call:
    """One completions or chat-completions request: its prompts (one per prompt, each answered n times)."""

    model: str
    adapter_id: str | None
    prompts: tuple[str, ...]
    """Completions: the prompt texts. Chat: empty (messages instead)."""
    messages: tuple[tuple[str, str], ...]
    sampling: SamplingParams
    n: int
    stream: bool
    include_usage: bool

    @property
    def choices(self) -> int:
        return max(1, len(self.prompts)) * self.n


def _field(body: dict, name: str, kinds: type | tuple[type, ...], default=None):
    value = body.get(name, default)
    if value is None:
        return default
    # bool is an int in Python; a JSON true is no number of tokens.
    if isinstance(value, bool) and bool not in (kinds if isinstance(kinds, tuple) else (kinds,)):
        raise InvalidArgument(f"'{name}' must be {_names(kinds)}, got a boolean")
    if not isinstance(value, kinds):
        raise InvalidArgument(f"'{name}' must be {_names(kinds)}, got {type(value).__name__}")
    return value


def _names(kinds) -> str:
    kinds = kinds if isinstance(kinds, tuple) else (kinds,)
    words = {int: "an integer", float: "a number", str: "a string", bool: "a boolean", list: "an array",
             dict: "an object"}
    return " or ".join(dict.fromkeys(words.get(k, k.__name__) for k in kinds))


def _refuse_unsupported(body: dict) -> None:
    for name, unset in _UNSUPPORTED_IF_SET.items():
        if name in body and body[name] not in unset:
            raise InvalidArgument(f"'{name}' is not supported by this server")
    fmt = body.get("response_format")
    if fmt not in (None, {"type": "text"}):
        raise InvalidArgument("'response_format' is not supported by this server (only {\"type\": \"text\"})")


def _stop(body: dict) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    if isinstance(stop, str):
        return [stop]
    if isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        return stop
    raise InvalidArgument("'stop' must be a string or an array of strings")


def model_target(model: object, base_name: str) -> str | None:
    """The adapter a `model` names; None for the base model itself."""
    if not isinstance(model, str) or not model:
        raise InvalidArgument("'model' is required: the base model's name or an adapter id (GET /v1/models)")
    return None if model == base_name else check_id(model)


def _common(body: dict, base_name: str, config: EngineConfig, max_tokens: int) -> dict:
    if not isinstance(body, dict):
        raise InvalidArgument("the request body must be a JSON object")
    _refuse_unsupported(body)
    n = _field(body, "n", int, 1)
    best_of = _field(body, "best_of", int, n)
    if best_of != n:
        raise InvalidArgument("'best_of' other than n is not supported by this server")
    stream = _field(body, "stream", bool, False)
    options = _field(body, "stream_options", dict, {})
    if options and not stream:
        raise InvalidArgument("'stream_options' is only allowed with stream: true")
    seed = _field(body, "seed", int)
    if seed is not None and seed < 0:
        seed += 2**64  # OpenAI's seed is a signed 64-bit integer; the engine's is unsigned
    sampling = checked_sampling(
        config, max_new_tokens=max_tokens, temperature=float(_field(body, "temperature", (int, float), 1.0)),
        top_p=float(_field(body, "top_p", (int, float), 1.0)), top_k=_field(body, "top_k", int, 0), seed=seed,
        stop=_stop(body))
    if n < 1:
        raise InvalidArgument(f"'n' must be >= 1, got {n}")
    return dict(model=body.get("model"), adapter_id=model_target(body.get("model"), base_name), sampling=sampling,
                n=n, stream=stream, include_usage=bool(_field(options, "include_usage", bool, False)))


def _check_choices(call: Call) -> Call:
    if call.choices > MAX_CHOICES:
        raise InvalidArgument(f"at most {MAX_CHOICES} choices per call (prompts x n), got {call.choices}")
    return call


def completion_call(body: dict, base_name: str, config: EngineConfig) -> Call:
    if not isinstance(body, dict):
        raise InvalidArgument("the request body must be a JSON object")
    max_tokens = _field(body, "max_tokens", int, COMPLETIONS_MAX_TOKENS)
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        prompts = (prompt,)
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        prompts = tuple(prompt)
    elif isinstance(prompt, list) and prompt and all(isinstance(p, int) or isinstance(p, list) for p in prompt):
        raise InvalidArgument("'prompt' as token ids is not supported by this server; send text")
    else:
        raise InvalidArgument("'prompt' must be a string or a non-empty array of strings")
    return _check_choices(Call(prompts=prompts, messages=(), **_common(body, base_name, config, max_tokens)))


def _content(message: dict, i: int) -> str:
    content = message.get("content")
    if content is None and message.get("role") == "assistant":
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise InvalidArgument(f"messages[{i}].content: only text parts are supported")
            parts.append(part["text"])
        return "".join(parts)
    raise InvalidArgument(f"messages[{i}].content must be a string or an array of text parts")


def chat_call(body: dict, base_name: str, config: EngineConfig) -> Call:
    if not isinstance(body, dict):
        raise InvalidArgument("the request body must be a JSON object")
    max_tokens = _field(body, "max_completion_tokens", int) or _field(body, "max_tokens", int, 0)
    raw = body.get("messages")
    if not isinstance(raw, list) or not raw:
        raise InvalidArgument("'messages' must be a non-empty array")
    messages = []
    for i, m in enumerate(raw):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise InvalidArgument(f"messages[{i}] must be an object with a 'role'")
        role = "system" if m["role"] == "developer" else m["role"]  # OpenAI's newer name for system
        messages.append((role, _content(m, i)))
    return _check_choices(Call(prompts=(), messages=tuple(messages), **_common(body, base_name, config, max_tokens)))
