"""The one answer extractor and format check behind rewards, evaluation, sampling, scoring and serving.

"tags": the last complete `<answer>` pair of `<think>...</think> <answer>...</answer>` (R1-Zero); "boxed": the last
complete `\\boxed{}` after `</think>` (R1-Distill, QwQ, Qwen3), or for a code task the whole text after it.
"""

from __future__ import annotations

import re
from typing import Sequence

from r1lab.model.templates import ANSWER_TAGS, THINK_CLOSE, THINK_OPEN

ANSWER_FORMATS = ("tags", "boxed")
_OPEN, _CLOSE = ANSWER_TAGS
_NO_TAG = r"(?:(?!</?think>|</?answer>).)*"  # any text that contains none of the four tags
_TAGS_FORMAT_RE = re.compile(rf"<think>{_NO_TAG}</think>\s*<answer>({_NO_TAG})</answer>\s*", re.DOTALL)
# a box command followed by its opening brace; `\boxed {x}` is the same box in LaTeX
_BOX_RE = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])\s*\{")


def check_answer_format(answer_format: str) -> str:
    if answer_format not in ANSWER_FORMATS:
        raise ValueError(f"answer format {answer_format!r} is not one of {', '.join(ANSWER_FORMATS)}")
    return answer_format


def _box_ends(text: str, open_brace: int) -> int | None:
    """Index of the brace closing the one at open_brace (escaped braces, `\\{` and `\\}`, do not count)."""
    depth, i = 0, open_brace
    while i < len(text):
        c = text[i]
        if c == "\\":
            i += 2  # `\{`, `\}` and `\\` are characters of the content, not structure
            continue
        depth += (c == "{") - (c == "}")
        if depth == 0:
            return i
        i += 1
    return None


def boxes(text: str) -> tuple[list[str], bool]:
    """The contents (stripped) of the complete boxes in text, in order, and whether some box is left unclosed."""
    found, start = [], 0
    while (match := _BOX_RE.search(text, start)) is not None:
        end = _box_ends(text, match.end() - 1)
        if end is None:
            return found, True  # everything after an unclosed brace is inside it
        found.append(text[match.end() : end].strip())
        start = end + 1
    return found, False


def last_boxed(text: str) -> str | None:
    """Content of the last complete \\boxed{...} / \\fbox{...} in text; None when the last one is never closed."""
    found, unclosed = boxes(text)
    return None if unclosed or not found else found[-1]


def after_think(text: str) -> str | None:
    """The text after the think block: after the last `</think>`; the whole text when it has no think tags at all
    (a model that does not reason aloud); None while a think block is open (the reasoning never ended)."""
    if THINK_CLOSE in text:
        return text.rpartition(THINK_CLOSE)[2]
    return None if THINK_OPEN in text else text


def _think_closed_once(text: str) -> str | None:
    """The final part of a response that opens `<think>` at its start and closes it exactly once, with no other think
    tag anywhere; None otherwise."""
    before, opens, rest = text.lstrip().partition(THINK_OPEN)
    if before or not opens or rest.count(THINK_CLOSE) != 1 or THINK_OPEN in rest:
        return None
    thinking, final = rest.split(THINK_CLOSE)
    return None if _OPEN in thinking or _CLOSE in thinking else final


def extract_answer(text: str, answer_format: str = "tags", code: bool = False) -> str | None:
    """The final answer of a response (prefix + completion), or None when it gives none."""
    if not isinstance(text, str):
        return None
    if answer_format == "boxed":
        final = after_think(text)
        return None if final is None else final.strip() if code else last_boxed(final)
    end = text.rfind(_CLOSE)
    start = text.rfind(_OPEN, 0, end) if end >= 0 else -1
    return None if start < 0 else text[start + len(_OPEN) : end].strip()


def format_reward(text: str, answer_format: str = "tags", code: bool = False) -> float:
    """1.0 iff the response has the format's shape, else 0.0. tags: `<think>...</think> <answer>non-empty</answer>`,
    each tag once, nothing around them. boxed: `<think>` at the start, `</think>` once, no box in the reasoning, then
    exactly one complete, non-empty box (a code task: a non-empty final part) and no answer tags."""
    if not isinstance(text, str):
        return 0.0
    if answer_format != "boxed":
        match = _TAGS_FORMAT_RE.fullmatch(text.lstrip())
        return 1.0 if match and match.group(1).strip() else 0.0
    final = _think_closed_once(text)
    if final is None or _OPEN in final or _CLOSE in final:
        return 0.0
    thinking = text[: len(text) - len(final)]
    if _BOX_RE.search(thinking):  # a box in the reasoning: a second final answer, or an attempt to plant one
        return 0.0
    if code:
        return 1.0 if final.strip() else 0.0
    found, unclosed = boxes(final)
    return 1.0 if len(found) == 1 and found[0] and not unclosed else 0.0


def uses_boxes(text: str) -> bool:
    """Whether text writes a box (for the auto choice: a reference solution or a completion)."""
    return isinstance(text, str) and _BOX_RE.search(text) is not None


def content_tags(answer_format: str) -> tuple[str, ...]:
    """The tags the server drops from a reply's content, keeping their inner text (none for boxed)."""
    return ANSWER_TAGS if answer_format == "tags" else ()


def choose_answer_format(requested: str, *, opens_think: bool = False, closes_think: bool = False, template: str = "",
                         solutions: Sequence[str] = (), completions: Sequence[str] = ()) -> tuple[str, str]:
    """(format, why) for a requested format: itself, or for "auto" what the chat template, the data's solutions or
    the completions imply."""
    if requested != "auto":
        return check_answer_format(requested), "as given"
    if opens_think:
        return "boxed", "the chat template opens <think> in the generation prompt"
    if closes_think:
        return "boxed", "the chat template is a reasoning model's: it writes </think>"
    if template == "r1zero":
        return "tags", "the r1zero template asks for <answer> tags"
    boxed = sum(uses_boxes(s) for s in solutions)
    if solutions and 2 * boxed > len(solutions):
        return "boxed", f"{boxed:,} of the data's {len(solutions):,} solutions use \\boxed"
    if completions:
        boxed, tagged = sum(uses_boxes(c) for c in completions), sum(_CLOSE in str(c) for c in completions)
        if boxed > tagged:
            return "boxed", f"{boxed:,} of {len(completions):,} completions write \\boxed, {tagged:,} an </answer>"
        return "tags", f"{tagged:,} of {len(completions):,} completions write an </answer>, {boxed:,} \\boxed"
    return "tags", "neither the template nor the data's solutions point to \\boxed"
