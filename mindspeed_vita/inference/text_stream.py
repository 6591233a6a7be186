"""Token ids -> text as it grows: stop strings, and the part that is safe to stream.

Streaming must never show text that the final answer will not contain: a trailing partial
UTF-8 character (decoded as U+FFFD), or the beginning of a stop string that later completes.
`TextStream.push` returns only text that can no longer change, so the streamed pieces always
concatenate to the non-streamed answer.
"""
from __future__ import annotations

from typing import Iterable, List, Sequence, Tuple


class TextStream:
    """Decodes generated ids incrementally and watches for stop strings."""

    def __init__(self, tokenizer, stop_ids: Iterable[int], stop: Sequence[str] = ()):
        self.tokenizer = tokenizer
        self.stop_ids = set(int(i) for i in stop_ids)
        self.stop = [s for s in stop if s]
        self.ids: List[int] = []
        self.text = ""  # the final text so far (cut at a stop string once one appears)
        self.emitted = 0  # characters of `text` already handed out
        self.hit_stop = False

    def _decode(self) -> str:
        shown = [t for t in self.ids if t not in self.stop_ids]
        return self.tokenizer.decode(shown, skip_special_tokens=True)

    def push(self, token_id: int) -> Tuple[str, bool]:
        """Add one token; returns (new text safe to show, whether a stop string appeared)."""
        if self.hit_stop:
            return "", True
        self.ids.append(int(token_id))
        text = self._decode()
        for s in self.stop:
            at = text.find(s)
            if at >= 0:
                text, self.hit_stop = text[:at], True
        self.text = text
        safe = len(text) if self.hit_stop else self._safe_length(text)
        delta = text[self.emitted:safe] if safe > self.emitted else ""
        self.emitted = max(self.emitted, safe)
        return delta, self.hit_stop

    def _safe_length(self, text: str) -> int:
        end = len(text)
        while end and text[end - 1] == "\ufffd":  # an incomplete multi-byte character
            end -= 1
        held = 0
        for s in self.stop:  # the longest tail that could still become a stop string
            for k in range(min(len(s) - 1, end), 0, -1):
                if text[end - k:end] == s[:k]:
                    held = max(held, k)
                    break
        return end - held

    def finish(self) -> str:
        """The text not yet handed out (call once, after the last token)."""
        delta = self.text[self.emitted:]
        self.emitted = len(self.text)
        return delta
