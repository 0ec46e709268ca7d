"""Language consistency (DeepSeek-R1, stage-2 RL): the share of the chain of thought's words in the target language.

A language is recognised by its script, which needs no model or word list: a run of letters of one script is a word,
and so is each Chinese character or kana (those scripts do not separate words); digits and symbols are no words.

    language_consistency("<think>我们 add 3 and 4</think><answer>7</answer>", "en")  # 2 of 4 words: 0.5
"""

from __future__ import annotations

import re

# Language (or script) name -> the scripts that count as written in it.
TARGETS: dict[str, frozenset[str]] = {
    "en": frozenset({"latin"}), "latin": frozenset({"latin"}),
    "zh": frozenset({"han"}), "cjk": frozenset({"han", "kana", "hangul"}),
    "ja": frozenset({"han", "kana"}), "ko": frozenset({"hangul"}),
    "ru": frozenset({"cyrillic"}), "cyrillic": frozenset({"cyrillic"}),
}
# (first, last code point, script) for the scripts told apart; other letters count as "other".
_RANGES = (
    (0x0041, 0x005A, "latin"), (0x0061, 0x007A, "latin"), (0x00C0, 0x024F, "latin"), (0x1E00, 0x1EFF, "latin"),
    (0x0370, 0x03FF, "greek"), (0x0400, 0x052F, "cyrillic"), (0x0590, 0x05FF, "hebrew"),
    (0x0600, 0x06FF, "arabic"), (0x0900, 0x097F, "devanagari"),
    (0x3040, 0x30FF, "kana"), (0x3400, 0x4DBF, "han"), (0x4E00, 0x9FFF, "han"), (0xF900, 0xFAFF, "han"),
    (0x20000, 0x3134F, "han"), (0x1100, 0x11FF, "hangul"), (0xAC00, 0xD7AF, "hangul"),
)
_SPLIT_SCRIPTS = frozenset({"han", "kana"})  # one character, one word
_LETTERS_RE = re.compile(r"[^\W\d_]+")  # runs of letters in any script
_THINK_OPEN, _THINK_CLOSE = "<think>", "</think>"


def script_of(char: str) -> str:
    code = ord(char)
    for first, last, script in _RANGES:
        if first <= code <= last:
            return script
    return "other"


def script_words(text: str) -> list[str]:
    """The script of each word of text (letters only; a run changing script is split where it changes)."""
    scripts: list[str] = []
    for run in _LETTERS_RE.findall(text):
        previous = None
        for char in run:
            script = script_of(char)
            if script in _SPLIT_SCRIPTS or script != previous:
                scripts.append(script)
            previous = script
    return scripts


def think_text(text: str) -> str:
    """The chain of thought: after the first <think>, up to </think> (or the end, if it was cut short); "" when
    there is no <think> at all."""
    _, opens, rest = text.partition(_THINK_OPEN)
    return rest.partition(_THINK_CLOSE)[0] if opens else ""


def check_target(target: str) -> frozenset[str]:
    """The scripts of a target language; ValueError naming the known ones otherwise."""
    scripts = TARGETS.get(target.lower()) if isinstance(target, str) else None
    if scripts is None:
        raise ValueError(f"unknown language {target!r}: use one of {', '.join(sorted(TARGETS))}")
    return scripts


def language_consistency(text: str, target: str = "en") -> float:
    """Share in [0, 1] of the words of text's <think> part written in target's script: 0 without a <think> tag, 1
    for one without words ("7+5=12": a reward against mixing languages should not push the model to write more)."""
    scripts = check_target(target)
    if not isinstance(text, str) or _THINK_OPEN not in text:
        return 0.0
    words = script_words(think_text(text))
    return sum(script in scripts for script in words) / len(words) if words else 1.0
