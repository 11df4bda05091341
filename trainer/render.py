"""One example to token ids and labels: the loss falls on completion / assistant tokens only.

Rendering follows how the server's Predict builds prompts, so an adapter learns on exactly what it
will see: with a chat template the prompt is a user turn rendered with the generation prompt, and
the completion is the assistant turn after it. Each piece is tokenized on its own, the way serving
tokenizes the rendered prompt and then generates the answer token by token. Which rendering a
training used is recorded in the adapter's metadata (core.prompt.rendering_record), and the server
renders a plain prompt to that adapter the same way (core.prompt.prompt_as_user_turn for chat).
"""

from __future__ import annotations

from dataclasses import dataclass

from jinja2.exceptions import TemplateError
from loraserve.core.errors import InvalidArgument

IGNORE = -100  # torch.nn.functional.cross_entropy's default ignore_index


@dataclass(frozen=True)
class Example:
    """A validated example: prompt/completion, or a chat as messages [{role, content}, ...]."""

    source: str
    """Where it came from, for error messages: "line 7" or "example 7"."""
    prompt: str | None = None
    completion: str | None = None
    messages: tuple[tuple[str, str], ...] | None = None
    """(role, content) pairs."""

    def canonical(self) -> dict:
        """The content alone (no source), the form hashed to identify the data set."""
        if self.messages is not None:
            return {"messages": [{"role": r, "content": c} for r, c in self.messages]}
        return {"prompt": self.prompt, "completion": self.completion}


@dataclass(frozen=True)
class Tokenized:
    input_ids: list[int]
    labels: list[int]
    """Same length as input_ids: the token itself where it is learned, IGNORE elsewhere."""
    source: str
    truncated: bool = False

    @property
    def label_tokens(self) -> int:
        # Position 0 has no preceding token to predict it from, so it never counts.
        return sum(1 for t in self.labels[1:] if t != IGNORE)


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def use_chat(template: str, tokenizer) -> bool:
    """Whether prompt/completion examples are rendered as a chat (see TrainSettings.template)."""
    if template == "plain":
        return False
    if template == "chat" and not has_chat_template(tokenizer):
        raise InvalidArgument("template=chat, but the base model's tokenizer has no chat template: use plain")
    return has_chat_template(tokenizer)


def tokenize_example(example: Example, tokenizer, *, chat: bool, max_length: int,
                     eos_token_ids: list[int]) -> Tokenized:
    """Token ids and labels, cut to max_length at the end; refused when no learned token survives."""
    if example.messages is not None:
        segments = _chat_segments(example, tokenizer, list(example.messages))
    elif chat:
        segments = _chat_segments(example, tokenizer, [("user", example.prompt), ("assistant", example.completion)])
    else:
        # Plain: the prompt gets the tokenizer's usual special tokens (BOS where it adds one), as a
        # raw-text Predict does; the completion follows directly.
        segments = [(example.prompt, False, True), (example.completion, True, False)]
    ids: list[int] = []
    labels: list[int] = []
    for text, learned, special in segments:
        piece = tokenizer(text, add_special_tokens=special)["input_ids"] if text or special else []
        if learned and (not piece or piece[-1] not in eos_token_ids):
            # The adapter must learn to stop: end every learned turn with EOS.
            piece = list(piece) + [eos_token_ids[0]]
        ids.extend(piece)
        labels.extend(piece if learned else [IGNORE] * len(piece))
    total = len(ids)
    truncated = total > max_length
    if truncated:
        # Cut the end: the prompt stays whole as serving would see it, the completion's start is kept.
        ids, labels = ids[:max_length], labels[:max_length]
    out = Tokenized(input_ids=ids, labels=labels, source=example.source, truncated=truncated)
    if out.label_tokens == 0:
        raise InvalidArgument(
            f"{example.source}: {total} tokens, and the prompt fills max_length={max_length}, so no completion "
            "token would be learned: shorten the prompt or raise max_length"
        )
    return out


def _chat_segments(example: Example, tokenizer, messages: list[tuple[str, str]]) -> list[tuple[str, bool, bool]]:
    """Split the rendered chat into (text, learned, add_special_tokens) pieces; assistant turns are learned.

    Each assistant turn's text is what rendering it adds after the history rendered with the
    generation prompt, so it holds exactly the tokens the model generates (content and end-of-turn).
    """
    if not has_chat_template(tokenizer):
        raise InvalidArgument(f"{example.source}: messages need a chat template, "
                              "and the base model's tokenizer has none")
    chat = [{"role": r, "content": c} for r, c in messages]
    segments: list[tuple[str, bool, bool]] = []
    done = ""
    for i, (role, _) in enumerate(messages):
        if role != "assistant":
            continue
        prompt = _render(example, tokenizer, chat[:i], generation_prompt=True)
        full = _render(example, tokenizer, chat[: i + 1], generation_prompt=False)
        if not prompt.startswith(done) or not full.startswith(prompt):
            raise InvalidArgument(
                f"{example.source}: the chat template does not render turn {i + 1} as a continuation of the "
                "turns before it, so the assistant's tokens cannot be told apart: "
                "use prompt/completion with template=plain"
            )
        reply = full[len(prompt):]
        # Whitespace after the end-of-turn token is formatting for the next turn, never generated.
        learned = reply.rstrip()
        segments.append((prompt[len(done):], False, False))
        segments.append((learned, True, False))
        segments.append((reply[len(learned):], False, False))
        done = full
    rest = _render(example, tokenizer, chat, generation_prompt=False)
    if rest.startswith(done):
        segments.append((rest[len(done):], False, False))
    return [s for s in segments if s[0] or s[1]]


def _render(example: Example, tokenizer, chat: list[dict], *, generation_prompt: bool) -> str:
    try:
        return tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=generation_prompt)
    except (TemplateError, ValueError, TypeError, KeyError, IndexError) as e:
        raise InvalidArgument(f"{example.source}: the chat template refused these messages: {e}") from None
