"""Token ids in, text deltas out: incremental detokenization and stop strings, for streaming a completion.

Byte-level BPE cannot be decoded a token at a time (a character can span tokens), so each step decodes a short window
and emits the new suffix, nothing while it ends in half a character (U+FFFD). The text ends right before a stop
string; a tail that could begin one is held back.
"""

from __future__ import annotations

from r1lab.model.tokenizer import Tokenizer

_INCOMPLETE = "\ufffd"


class IncrementalDetokenizer:
    """push(token) -> the new text it completes (often "", e.g. for end-of-text or half a character)."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self._prefix = 0  # window start: decoding from here gives the same text as decoding from the start
        self._read = 0  # tokens already turned into emitted text

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        done = self.tokenizer.decode(self.ids[self._prefix: self._read])
        full = self.tokenizer.decode(self.ids[self._prefix:])
        if len(full) > len(done) and not full.endswith(_INCOMPLETE):
            self._prefix, self._read = self._read, len(self.ids)
            return full[len(done):]
        return ""

    def flush(self) -> str:
        """The text still held back (a trailing partial character is emitted as U+FFFD at the very end)."""
        done = self.tokenizer.decode(self.ids[self._prefix: self._read])
        full = self.tokenizer.decode(self.ids[self._prefix:])
        self._prefix = self._read = len(self.ids)
        return full[len(done):]


class StopCutter:
    """Text deltas in, text deltas out, ending before the first stop string (`hit` turns True)."""

    def __init__(self, stops: tuple[str, ...] | list[str] = ()):
        self.stops = [s for s in stops if s]
        self.text = ""  # everything received, cut at the stop string once hit
        self.hit = False
        self._sent = 0

    def push(self, delta: str) -> str:
        if self.hit or not delta:
            return ""
        self.text += delta
        if not self.stops:
            return self._send(len(self.text))
        # Held-back text is never a prefix of a stop string that ended earlier, so a match starts at _sent or later.
        found = [i for i in (self.text.find(s, self._sent) for s in self.stops) if i != -1]
        if found:
            self.hit = True
            self.text = self.text[: min(found)]
            return self._send(len(self.text))
        return self._send(len(self.text) - prefix_tail_len(self.text[self._sent:], self.stops))

    def flush(self) -> str:
        return self._send(len(self.text))

    def _send(self, upto: int) -> str:
        out = self.text[self._sent: upto]
        self._sent = max(self._sent, upto)
        return out


def prefix_tail_len(text: str, strings) -> int:
    """Length of the longest tail of text that is a proper prefix of one of strings (held back: it may begin one)."""
    for k in range(min(len(text), max(len(s) for s in strings) - 1), 0, -1):
        if any(s.startswith(text[-k:]) for s in strings):
            return k
    return 0


class TextStream:
    """One completion's text as it grows: token ids in, stop-aware text deltas out."""

    def __init__(self, tokenizer: Tokenizer, stops: tuple[str, ...] | list[str] = ()):
        self._detok = IncrementalDetokenizer(tokenizer)
        self._cutter = StopCutter(stops)

    @property
    def stopped(self) -> bool:
        return self._cutter.hit

    @property
    def text(self) -> str:
        return self._cutter.text

    def push(self, token_id: int) -> str:
        return self._cutter.push(self._detok.push(token_id))

    def flush(self) -> str:
        return self._cutter.push(self._detok.flush()) + self._cutter.flush()  # both "" once a stop string was hit
