"""Incremental detokenization with stop sequences: emit only text that can no longer change."""

from __future__ import annotations


class TextStream:
    """Turns a growing list of token ids into safe text deltas.

    Decoding token by token breaks multi-byte characters and merges, so a window of ids is decoded
    and only the stable tail is emitted (TGI/vLLM's prefix/read offsets). Text that might be the
    start of a stop sequence is held back until it is known not to be one.
    """

    def __init__(self, tokenizer, stop: tuple[str, ...] = ()):
        self.tokenizer = tokenizer
        self.stop = tuple(s for s in stop if s)
        self.ids: list[int] = []
        self.text = ""
        self.emitted = 0
        self._prefix = 0
        self._read = 0
        self.stopped = False

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def add(self, token_id: int) -> str:
        """Append one token; returns the new text that is safe to show (may be empty)."""
        self.ids.append(token_id)
        prefix_text = self._decode(self.ids[self._prefix : self._read])
        new_text = self._decode(self.ids[self._prefix :])
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
            self.text += new_text[len(prefix_text) :]
            self._prefix, self._read = self._read, len(self.ids)
        return self._release()

    def _release(self) -> str:
        if self.stop:
            start = max(0, self.emitted - max(len(s) for s in self.stop))
            hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
            if hits:
                self.text = self.text[: min(hits)]
                self.stopped = True
                return self._flush()
            safe = len(self.text) - self._held_back()
        else:
            safe = len(self.text)
        delta = self.text[self.emitted : safe]
        self.emitted = max(self.emitted, safe)
        return delta

    def _held_back(self) -> int:
        """Length of the longest text suffix that is a proper prefix of a stop sequence."""
        longest = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(self.text)), longest, -1):
                if self.text.endswith(s[:n]):
                    longest = n
                    break
        return longest

    def _flush(self) -> str:
        delta = self.text[self.emitted :]
        self.emitted = len(self.text)
        return delta

    def finish(self) -> str:
        """The rest of the text, at the end of generation."""
        if not self.stopped:
            tail = self._decode(self.ids[self._prefix :])
            prefix_text = self._decode(self.ids[self._prefix : self._read])
            if len(tail) > len(prefix_text):
                self.text += tail[len(prefix_text) :]
        return self._flush()
