"""Prompt text or chat messages -> token ids, with the base model's own chat template."""

from __future__ import annotations

from loraserve.core.errors import InvalidArgument

ROLES = ("system", "user", "assistant", "tool")


_LONGEST: dict[int, int] = {}


def longest_token_bytes(tokenizer) -> int:
    """Bytes of the tokenizer's longest vocabulary entry (once per tokenizer): no text of more than
    max_tokens * this many bytes can fit in max_tokens tokens."""
    key = id(tokenizer)
    if key not in _LONGEST:
        _LONGEST[key] = max((len(t.encode("utf-8", "replace")) for t in tokenizer.get_vocab()), default=1)
    return _LONGEST[key]


def render(tokenizer, prompt: str, messages: list[tuple[str, str]], max_tokens: int | None = None) -> list[int]:
    """Token ids of a prompt or of chat messages. With max_tokens, text that cannot fit is refused by its
    size before it is tokenized, so an oversized prompt costs no tokenizer time or memory."""
    if prompt and messages:
        raise InvalidArgument("give either prompt or messages, not both")
    if max_tokens is not None:
        size = len(prompt.encode("utf-8", "replace")) + sum(len(c.encode("utf-8", "replace")) for _, c in messages)
        cap = max_tokens * longest_token_bytes(tokenizer)
        if size > cap:
            raise InvalidArgument(f"the prompt has {size} bytes, more than {max_tokens} tokens can hold "
                                  f"(at most {cap} bytes); the limit is {max_tokens} tokens")
    if messages:
        for role, _ in messages:
            if role not in ROLES:
                raise InvalidArgument(f"message role {role!r} is not one of {', '.join(ROLES)}")
        if getattr(tokenizer, "chat_template", None) is None:
            raise InvalidArgument("this base model has no chat template: send a plain prompt instead of messages")
        chat = [{"role": role, "content": content} for role, content in messages]
        try:
            ids = tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=True, return_dict=False)
        except Exception as e:  # noqa: BLE001 - the template rejects some role orders; that is bad input
            raise InvalidArgument(f"the chat template rejected these messages: {e}") from None
        if isinstance(ids, dict) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
        return list(ids)
    if not prompt:
        raise InvalidArgument("the prompt is empty: give prompt or messages")
    return tokenizer(prompt, add_special_tokens=True)["input_ids"]
