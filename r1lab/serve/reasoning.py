"""Split streamed completion text into DeepSeek's `reasoning_content` and `content`, chunk by chunk.

The rules (the same for a whole text and for a stream cut anywhere, tags included):
- text between `<think>` and `</think>` is reasoning; everything else is content;
- in the tags answer format, `<answer>` and `</answer>` are dropped from the content, their inner text kept: the
  content is the answer a reader wants, and the R1 format only wraps it; in the boxed format the content is the
  text after `</think>` as written, box included (the tags of each format: r1lab/rewards/answers.py);
- a `</think>` with no open think block is dropped, as is a `<think>` inside one;
- a prompt that ends with a prefilled `<think>` starts the split inside the reasoning (`in_think=True`);
- each part is stripped of leading and trailing whitespace (R1 writes `<think> ... </think> <answer> ... </answer>`);
  whitespace inside a part is kept, so trailing whitespace is held back until more text of that part arrives.
A tag may arrive split across tokens, so a tail of a chunk that could begin a tag is held until the next chunk.
"""

from __future__ import annotations

from r1lab.model.templates import THINK_CLOSE, THINK_OPEN
from r1lab.rewards.answers import content_tags

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

    def end(self) -> None:
        self.pending_space = ""


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
            at, tag = _first_tag(buf, tags)
            if tag is None:
                keep = _partial_tag_len(buf, tags)
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
            self._reasoning.end()  # whitespace before </think> belongs to no one


def split_reasoning(text: str, in_think: bool = False, answer_format: str = "tags") -> tuple[str, str]:
    """(reasoning, content) of a whole completion: exactly what streaming its pieces would give."""
    splitter = ReasoningSplitter(in_think, answer_format)
    r1, c1 = splitter.feed(text)
    r2, c2 = splitter.finish()
    return r1 + r2, c1 + c2


def _first_tag(buf: str, tags: tuple[str, ...]) -> tuple[int, str | None]:
    best, best_tag = len(buf), None
    for tag in tags:
        i = buf.find(tag)
        if i != -1 and i < best:
            best, best_tag = i, tag
    return best, best_tag


def _partial_tag_len(buf: str, tags: tuple[str, ...]) -> int:
    """Length of the longest tail of buf that is a proper prefix of one of the tags."""
    for k in range(min(len(buf), max(len(t) for t in tags) - 1), 0, -1):
        tail = buf[-k:]
        if any(t.startswith(tail) for t in tags):
            return k
    return 0
