"""Token ids to text as they are sampled, with stop strings.

Decoding a single token alone loses what depends on its neighbours (a SentencePiece word's leading
space, the bytes of a character split over tokens), and decoding everything at every token costs
quadratic time. So the text is decoded over a short window of recent tokens: the new text is what
decoding the window with the new token adds to decoding it without. Text ending in an incomplete
character waits for the next token (at most three: a UTF-8 character has four bytes).

Stop strings end the text before them. Text that could still turn out to be the start of a stop
string is held back until it cannot (OpenAI's clients never see a stop string).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

REPLACEMENT = "\ufffd"
MAX_PENDING = 4  # tokens an incomplete character may wait for


class IncrementalText:
    """The text of a growing list of token ids, handed out in pieces as it becomes final."""

    def __init__(self, tokenizer: Any, stop: Sequence[str] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.hold = max((len(s) for s in self.stop), default=1) - 1
        self.ids: list[int] = []
        self.text = ""  # decoded so far (cut at a stop string once one is found)
        self.sent = 0  # characters of `text` handed out
        self.stopped = False
        self._window = 0  # first id of the decoding window
        self._read = 0  # ids before this are in `text`

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def add(self, token: int) -> str:
        """Take the next token; the text that became final (possibly empty)."""
        if self.stopped:
            return ""
        self.ids.append(token)
        before = len(self.text)
        self._advance(final=False)
        if self.stop and len(self.text) > before:
            start = max(0, before - self.hold)
            found = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
            if found:
                self.text = self.text[:min(found)]
                self.stopped = True
                return self._hand_out(len(self.text))
        return self._hand_out(len(self.text) - self.hold)

    def finish(self) -> str:
        """The request ended: everything not handed out yet (held-back and incomplete text included)."""
        if not self.stopped:
            self._advance(final=True)
        return self._hand_out(len(self.text))

    def _advance(self, final: bool) -> None:
        done = self._decode(self.ids[self._window:self._read])
        full = self._decode(self.ids[self._window:])
        incomplete = full.endswith(REPLACEMENT) and len(self.ids) - self._read < MAX_PENDING
        if len(full) > len(done) and (final or not incomplete):
            self.text += full[len(done):]
            self._window, self._read = self._read, len(self.ids)

    def _hand_out(self, upto: int) -> str:
        if upto <= self.sent:
            return ""
        out = self.text[self.sent:upto]
        self.sent = upto
        return out
