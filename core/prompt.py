"""Prompt text or chat messages -> token ids, with the base model's own chat template.

A plain prompt is rendered one of two ways (an adapter's loraserve_metadata.json says which one its
training used, see rendering_record / parse_rendering):
- raw: the text tokenized as is, with the tokenizer's usual special tokens (BOS where it adds one);
- chat: the text as the single user turn of the chat template, with the generation prompt and no
  system message of ours, tokenized without added special tokens: token for token what the trainer
  (trainer/render.py) puts before the completion of a {"prompt", "completion"} example.
"""

from __future__ import annotations

import hashlib

from loraserve.core.errors import FailedPrecondition, InvalidArgument

ROLES = ("system", "user", "assistant", "tool")

RAW, CHAT = "plain", "chat"
"""The values of the metadata's rendering.template: how a plain prompt becomes token ids."""
_RENDERING_KEYS = {"template", "generation_prompt", "system_prompt", "chat_template_sha256"}


_LONGEST: dict[int, int] = {}


def longest_token_bytes(tokenizer) -> int:
    """Bytes of the tokenizer's longest vocabulary entry (once per tokenizer): no text of more than
    max_tokens * this many bytes can fit in max_tokens tokens."""
    key = id(tokenizer)
    if key not in _LONGEST:
        _LONGEST[key] = max((len(t.encode("utf-8", "replace")) for t in tokenizer.get_vocab()), default=1)
    return _LONGEST[key]


def chat_template_sha256(tokenizer) -> str | None:
    template = getattr(tokenizer, "chat_template", None)
    if not isinstance(template, str):
        return None
    return hashlib.sha256(template.encode()).hexdigest()


def rendering_record(chat: bool, tokenizer) -> dict:
    """The metadata's "rendering" object: how the prompt of a {"prompt", "completion"} example was
    rendered in training, and so how a plain prompt to the adapter is rendered when served.
    chat_template_sha256 is informational (which template the trainer applied)."""
    if not chat:
        return {"template": RAW}
    return {"template": CHAT, "generation_prompt": True, "system_prompt": None,
            "chat_template_sha256": chat_template_sha256(tokenizer)}


def parse_rendering(value) -> str:
    """RAW or CHAT from a metadata "rendering" object; ValueError for anything this version cannot
    reproduce exactly (an unknown template or key, a system prompt, no generation prompt): rendering
    such an adapter's prompts another way would silently feed it what it never learned on."""
    if not isinstance(value, dict):
        raise ValueError(f"rendering must be an object, got {type(value).__name__}")
    unknown = sorted(str(k)[:40] for k in set(value) - _RENDERING_KEYS)
    if unknown:
        raise ValueError(f"rendering has unknown key(s) {', '.join(unknown)}")
    template = value.get("template")
    if template == RAW:
        extra = sorted(set(value) - {"template"})
        if extra:
            raise ValueError(f"rendering template {RAW} takes no {', '.join(extra)}")
        return RAW
    if template != CHAT:
        shown = repr(template)[:40] if isinstance(template, str) else type(template).__name__
        raise ValueError(f"rendering template must be {RAW} or {CHAT}, got {shown}")
    if value.get("generation_prompt", True) is not True:
        raise ValueError("rendering without the generation prompt is not supported")
    if value.get("system_prompt") is not None:
        raise ValueError("rendering with a system prompt is not supported")
    sha = value.get("chat_template_sha256")
    if sha is not None and not isinstance(sha, str):
        raise ValueError("rendering chat_template_sha256 must be a string")
    return CHAT


def check_fits(tokenizer, texts: list[str], max_tokens: int, what: str = "the prompt") -> None:
    """Refuse text that cannot fit max_tokens by its size alone, before it costs any tokenizer time or
    memory: no token is longer than the vocabulary's longest entry."""
    size = sum(len(t.encode("utf-8", "replace")) for t in texts)
    cap = max_tokens * longest_token_bytes(tokenizer)
    if size > cap:
        raise InvalidArgument(f"{what} has {size} bytes, more than {max_tokens} tokens can hold "
                              f"(at most {cap} bytes); the limit is {max_tokens} tokens")


def render(tokenizer, prompt: str, messages: list[tuple[str, str]], max_tokens: int | None = None, *,
           prompt_as_chat: bool = False) -> list[int]:
    """Token ids of a prompt or of chat messages. With max_tokens, text that cannot fit is refused by its
    size before it is tokenized, so an oversized prompt costs no tokenizer time or memory.
    prompt_as_chat renders a plain prompt as the user turn of the chat template (the CHAT rendering)."""
    if prompt and messages:
        raise InvalidArgument("give either prompt or messages, not both")
    if max_tokens is not None:
        check_fits(tokenizer, [prompt, *(c for _, c in messages)], max_tokens)
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
    if prompt_as_chat:
        return prompt_as_user_turn(tokenizer, prompt)
    return tokenizer(prompt, add_special_tokens=True)["input_ids"]


def prompt_as_user_turn(tokenizer, prompt: str) -> list[int]:
    """The CHAT rendering of a plain prompt: the chat template rendered to text, then tokenized without
    added special tokens, the same two steps as the trainer's prompt part."""
    if not getattr(tokenizer, "chat_template", None):
        raise FailedPrecondition("this adapter was trained on prompts rendered with a chat template, and this "
                                 "base model has none; set raw_prompt to tokenize the text as is")
    try:
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
    except Exception as e:  # noqa: BLE001 - as for messages: the template refused this input
        raise InvalidArgument(f"the chat template rejected this prompt: {e}") from None
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])
