"""Tokens to text as they come: the pieces a stream sends, and stop strings.

The text so far is always the decode of every token so far (so a stream's pieces add up to what a whole
answer holds); a piece is held back while it ends in an incomplete character (``\\ufffd``) or could be the
start of a stop string. A stop string ends the answer before it, as the OpenAI API does.
"""

from __future__ import annotations

from collections.abc import Callable

__all__ = ["TextStream"]


class TextStream:
    """Feed token ids with :meth:`push`; it returns the new text that is safe to send, and :attr:`stopped`
    says a stop string was met (the text ends before it)."""

    def __init__(self, decode: Callable[[list[int]], str], stops: list[str]) -> None:
        self.decode, self.stops = decode, stops
        self.tokens: list[int] = []
        self.text = ""  # everything decoded, stop string cut
        self.sent = 0  # characters of text already returned
        self.stopped = False

    def push(self, token: int) -> str:
        self.tokens.append(token)
        self.text = self.decode(self.tokens)
        hits = [i for i in (self.text.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.text = self.text[: min(hits)]
            self.stopped = True
            return self.flush()
        safe = len(self.text)
        if self.text.endswith("\ufffd"):
            safe = self.text.rfind("\ufffd")  # wait for the rest of the character
        safe = min(safe, len(self.text) - self._stop_prefix())
        if safe <= self.sent:
            return ""
        piece, self.sent = self.text[self.sent : safe], safe
        return piece

    def _stop_prefix(self) -> int:
        """The length of the longest end of the text that begins a stop string."""
        return max(
            (n for s in self.stops for n in range(min(len(s) - 1, len(self.text)), 0, -1)
             if self.text.endswith(s[:n])),
            default=0,
        )  # fmt: skip

    def flush(self) -> str:
        """The text not sent yet (at the end of the answer)."""
        piece, self.sent = self.text[self.sent :], len(self.text)
        return piece
