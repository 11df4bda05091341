"""Prompt text or chat messages -> token ids, with the base model's own chat template."""

from __future__ import annotations

from loraserve.core.errors import InvalidArgument

ROLES = ("system", "user", "assistant", "tool")


def render(tokenizer, prompt: str, messages: list[tuple[str, str]]) -> list[int]:
    if prompt and messages:
        raise InvalidArgument("give either prompt or messages, not both")
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
