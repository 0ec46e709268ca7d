"""An LLM judge as a reward (`reward/judge`): `r1lab grpo --judge-url http://host:8000/v1 --judge-model NAME`.

An OpenAI-compatible endpoint scores each distinct judge prompt in [0, 1]; a failed request or an unreadable reply
gives 0 and counts in scorer_errors / scorer_timeouts, so the judge can never end the run.
"""

from __future__ import annotations

import re
import string
import threading
import warnings
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

PLACEHOLDERS = ("problem", "reference", "completion")
CACHE_SIZE = 65_536  # judged prompts kept: a step's repeated completions (and a group's duplicates) cost one call

DEFAULT_TEMPLATE = """You are grading a student's answer to a problem.

Problem:
{problem}

Reference answer:
{reference}

Student's answer:
{completion}

Is the student's final answer correct and is the reasoning sound? End your reply with a line `score: X`, where X is a \
number from 0 (wrong) to 1 (fully correct)."""

# "score: 0.8", "Score = 7/10", "**score**: 8 out of 10"; the last one in the reply counts (a judge may think aloud)
_VALUE = r"([-+]?\d+(?:\.\d+)?)\s*(?:(?:/|out of)\s*(\d+(?:\.\d+)?))?"  # X, X/N or X out of N
_SCORE_RE = re.compile(rf"score\W{{0,4}}?\s*[:=]\s*\**\s*{_VALUE}", re.IGNORECASE)
_NUMBER_RE = re.compile(rf"\s*{_VALUE}\s*\.?\s*")


def template_problem(template: str) -> str | None:
    """What is wrong with a judge template, or None: it must name {completion} and no placeholder but the three."""
    try:
        names = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    except ValueError as err:  # a lone "{" or "}": literal braces are written {{ and }}
        return f"is not a template ({err}; write a literal brace as {{{{ or }}}})"
    unknown = sorted(names - set(PLACEHOLDERS))
    if unknown:
        return f"has the placeholder {{{unknown[0]}}}; only {{problem}}, {{reference}} and {{completion}} are filled"
    return None if "completion" in names else "has no {completion} placeholder: the judge would not see the answer"


def load_template(path: str) -> str:
    """The template in a file (DEFAULT_TEMPLATE for ""); ValueError saying what is wrong."""
    if not path:
        return DEFAULT_TEMPLATE
    try:
        template = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"judge_template {path!r} cannot be read: {err}") from None
    problem = template_problem(template)
    if problem:
        raise ValueError(f"judge_template {path!r} {problem}")
    return template


def parse_score(reply: object) -> float | None:
    """The score in a judge's reply, in [0, 1], or None when there is no readable one (never raises): the last
    `score: X` after any </think>, else a reply that is only a number. X/N ("7/10", "7 out of 10") is divided by N;
    a bare X in [0, 1] is taken as it is, one in (1, 10] as a 0-10 score; anything else is unreadable."""
    if not isinstance(reply, str):
        return None
    answer = reply.rpartition("</think>")[2]
    if found := _SCORE_RE.findall(answer):
        value, scale = found[-1]
    elif match := _NUMBER_RE.fullmatch(answer):
        value, scale = match.groups()
    else:
        return None
    value = float(value)
    if scale:  # X/N
        top = float(scale)
        return value / top if top > 0 and 0 <= value <= top else None
    return value if 0 <= value <= 1 else value / 10 if 1 < value <= 10 else None


@dataclass(frozen=True)
class JudgeSettings:
    url: str
    model: str
    api_key: str = field(default="EMPTY", repr=False)  # openai needs one; `r1lab serve` without --api-key ignores it
    template: str = DEFAULT_TEMPLATE
    concurrency: int = 8
    timeout_s: float = 60.0
    retries: int = 2
    max_tokens: int = 512


@dataclass
class JudgeScores:
    scores: list[float]
    errors: int  # unreadable replies and failed requests
    timeouts: int  # requests that ran past timeout_s on every try


class Judge:
    """Scores completions with an LLM through the openai client, several requests at once, each prompt once."""

    def __init__(self, settings: JudgeSettings) -> None:
        import openai  # optional: only a run with a judge needs it

        self.settings = settings
        self._openai = openai
        self.client = openai.OpenAI(base_url=settings.url, api_key=settings.api_key, timeout=settings.timeout_s,
                                    max_retries=settings.retries)
        self.pool = ThreadPoolExecutor(settings.concurrency, thread_name_prefix="r1lab-judge")
        self.cache: OrderedDict[str, float | None] = OrderedDict()  # judge prompt -> score (None: unreadable)
        self.lock = threading.Lock()

    def score(self, problems: Sequence[str], references: Sequence[str], completions: Sequence[str]) -> JudgeScores:
        prompts = [self.settings.template.format(problem=p, reference=r, completion=c)
                   for p, r, c in zip(problems, references, completions)]
        with self.lock:
            todo = list(dict.fromkeys(p for p in prompts if p not in self.cache))
        outcomes = dict(zip(todo, self.pool.map(self._ask, todo)))
        scores, errors, timeouts = [], 0, 0
        for prompt in prompts:
            if prompt in outcomes:
                kind, value = outcomes[prompt]
            else:
                with self.lock:
                    self.cache.move_to_end(prompt)
                    kind, value = "ok", self.cache[prompt]
            scores.append(value if value is not None else 0.0)
            errors += kind == "error" or (kind == "ok" and value is None)
            timeouts += kind == "timeout"
        return JudgeScores(scores, errors, timeouts)

    def _ask(self, prompt: str) -> tuple[str, float | None]:
        """("ok", score or None when unreadable), cached; a failed request ("timeout" / "error") is not cached, so
        the next step asks again."""
        try:
            reply = self.client.chat.completions.create(
                model=self.settings.model, messages=[{"role": "user", "content": prompt}], temperature=0.0,
                max_tokens=self.settings.max_tokens)
            text = reply.choices[0].message.content
        except self._openai.APITimeoutError:
            _warn_once("timeout", f"no reply within {self.settings.timeout_s:g} s after {self.settings.retries} "
                                  f"retries")
            return "timeout", None
        except Exception as err:  # refused, unreachable, a malformed response: that completion's judgement only
            _warn_once("error", f"{type(err).__name__}: {err}")
            return "error", None
        score = parse_score(text)
        if score is None:
            _warn_once("unreadable", f"no score in its reply {str(text)[:200]!r}")
        with self.lock:
            self.cache[prompt] = score
            if len(self.cache) > CACHE_SIZE:
                self.cache.popitem(last=False)
        return "ok", score


_WARNED: set[str] = set()


def _warn_once(kind: str, reason: str) -> None:
    if kind not in _WARNED:
        _WARNED.add(kind)
        counted = "scorer_timeouts" if kind == "timeout" else "scorer_errors"
        warnings.warn(f"judge: {reason}; that completion's judge reward is 0, counted in {counted} (reported once)",
                      RuntimeWarning)
