"""Incremental detokenization with stop strings, in the TGI/vLLM prefix_offset/read_offset style."""

from __future__ import annotations

from typing import Any

# Prompt tokens kept as decoding context, so the first output token gets its leading space right.
INITIAL_CONTEXT_TOKENS = 5
REPLACEMENT_CHAR = "\ufffd"


class IncrementalDetokenizer:
    """Turns a request's output token ids into text one token at a time.

    Each `append` decodes only a small window of recent tokens: `ids[prefix_offset:read_offset]`
    is text already emitted (context), `ids[prefix_offset:]` the same plus the new tokens. The new
    suffix is emitted only when it does not end in U+FFFD, so a character whose bytes span several
    tokens appears whole or not at all. `output_text` is everything emitted so far, cut before the
    first stop string (then `stopped` is True and further tokens are ignored).

    Tokens that end with an incomplete character are held back until it completes; if generation
    ends there, those trailing bytes never reach `output_text`.
    """

    def __init__(
        self,
        tokenizer: Any,
        prompt_token_ids: list[int],
        stop: list[str],
        skip_special_tokens: bool = True,
    ) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.stop = list(stop)
        self.stop_holdback = max((len(s) for s in self.stop), default=1) - 1
        # Only the tail of the prompt is kept: offsets index into this list, never the whole prompt.
        self._token_ids = list(prompt_token_ids[-INITIAL_CONTEXT_TOKENS:])
        self.prefix_offset = 0
        self.read_offset = len(self._token_ids)
        self.output_text = ""
        self.stopped = False

    def append(self, token_id: int) -> None:
        """Add one generated token; update `output_text` and `stopped`."""
        if self.stopped:
            return
        self._token_ids.append(token_id)
        new_text = self._decode_new_text()
        if new_text:
            self._add_text(new_text)

    def stream_text(self, finished: bool) -> str:
        """The text safe to show now (see `num_visible_chars`)."""
        return self.output_text[: self.num_visible_chars(finished)]

    def num_visible_chars(self, finished: bool) -> int:
        """How much of `output_text` is safe to show now: while unfinished, a tail that could begin a stop
        string is held back. Never decreases for one request, so shown text is never taken back."""
        if finished or self.stopped:
            return len(self.output_text)
        return max(0, len(self.output_text) - self.stop_holdback)

    def _decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=self.skip_special_tokens)

    def _decode_new_text(self) -> str:
        """The text the tokens after read_offset add; "" while it would end mid-character."""
        prefix_text = self._decode(self._token_ids[self.prefix_offset : self.read_offset])
        full_text = self._decode(self._token_ids[self.prefix_offset :])
        if len(full_text) <= len(prefix_text) or full_text.endswith(REPLACEMENT_CHAR):
            return ""
        # Slide the window: what was new becomes the context, and drop ids no window needs again.
        del self._token_ids[: self.read_offset]
        self.prefix_offset, self.read_offset = 0, len(self._token_ids)
        return full_text[len(prefix_text) :]

    def _add_text(self, new_text: str) -> None:
        """Append new_text; cut at the earliest stop string, searching only where one could start."""
        search_start = max(0, len(self.output_text) - self.stop_holdback)
        self.output_text += new_text
        hits = [i for i in (self.output_text.find(s, search_start) for s in self.stop) if i >= 0]
        if hits:
            self.output_text = self.output_text[: min(hits)]
            self.stopped = True


__all__ = ["IncrementalDetokenizer"]
