"""Split streamed completion text into DeepSeek's `reasoning_content` (inside `<think>`...`</think>`) and `content`
(without the answer format's tags), the same however the stream is cut; stray tags are dropped, each part stripped.
"""

from __future__ import annotations

from r1lab.model.templates import THINK_CLOSE, THINK_OPEN
from r1lab.rewards.answers import content_tags
from r1lab.serve.textstream import prefix_tail_len

_INSIDE_TAGS = (THINK_OPEN, THINK_CLOSE)


class _Part:
    """One output channel that strips its leading and trailing whitespace while streaming."""

    def __init__(self) -> None:
        self.started = False
        self.pending_space = ""

    def add(self, text: str) -> str:
        if not self.started:
            text = text.lstrip()
            if not text:
                return ""
            self.started = True
        body = text.rstrip()
        if not body:  # only whitespace: keep it until we know whether more text follows
            self.pending_space += text
            return ""
        out = self.pending_space + body
        self.pending_space = text[len(body):]
        return out


class ReasoningSplitter:
    """Feed text deltas, get (reasoning_delta, content_delta) back; call finish() at the end of the stream."""

    def __init__(self, in_think: bool = False, answer_format: str = "tags"):
        self.in_think = in_think
        self._outside_tags = (*_INSIDE_TAGS, *content_tags(answer_format))
        self._held = ""
        self._reasoning, self._content = _Part(), _Part()

    def feed(self, text: str) -> tuple[str, str]:
        buf, reasoning, content = self._held + text, [], []
        while buf:
            tags = _INSIDE_TAGS if self.in_think else self._outside_tags
            at, tag = min(((buf.find(t), t) for t in tags if t in buf), default=(len(buf), None), key=lambda m: m[0])
            if tag is None:
                keep = prefix_tail_len(buf, tags)
                self._emit(buf[: len(buf) - keep], reasoning, content)
                self._held = buf[len(buf) - keep:]
                break
            self._emit(buf[:at], reasoning, content)
            self._on_tag(tag)
            buf, self._held = buf[at + len(tag):], ""
        return "".join(reasoning), "".join(content)

    def finish(self) -> tuple[str, str]:
        """Flush what was held back as a possible tag start: at the end of the stream it is plain text."""
        reasoning, content = [], []
        self._emit(self._held, reasoning, content)
        self._held = ""
        return "".join(reasoning), "".join(content)

    def _emit(self, text: str, reasoning: list[str], content: list[str]) -> None:
        if text:
            (reasoning if self.in_think else content).append(
                (self._reasoning if self.in_think else self._content).add(text))

    def _on_tag(self, tag: str) -> None:
        if tag == THINK_OPEN and not self.in_think:
            self.in_think = True
        elif tag == THINK_CLOSE and self.in_think:
            self.in_think = False
            self._reasoning.pending_space = ""  # whitespace before </think> belongs to no one


def split_reasoning(text: str, in_think: bool = False, answer_format: str = "tags") -> tuple[str, str]:
    """(reasoning, content) of a whole completion: exactly what streaming its pieces would give."""
    splitter = ReasoningSplitter(in_think, answer_format)
    r1, c1 = splitter.feed(text)
    r2, c2 = splitter.finish()
    return r1 + r2, c1 + c2

