"""Generated arithmetic problems ("3+5*2-7"): the smallest task on which a tiny model can learn to reason; evaluated
exactly with normal precedence, split into train and test by a stable hash of the expression text.
"""

from __future__ import annotations

import random
import re

from r1lab.rewards.tasks.base import Problem
from r1lab.rewards.tasks.dataset import draw_unique

# The demo's task (two 3-digit numbers to add), which "arithmetic" means when no task options are given, so that
# `r1lab eval --model runs/demo/grpo/model` evaluates what the demo's model learned.
DEMO_OPTIONS = {"min_terms": 2, "max_terms": 2, "min_digits": 3, "max_digits": 3, "ops": "+"}
# The tool demo's task (`r1lab demo --tools python`): a product the tiny model cannot compute in its head but can hand
# to the Python tool; both numbers have 3 digits, so that the call copies them from fixed offsets.
TOOL_DEMO_OPTIONS = {"min_terms": 2, "max_terms": 2, "min_digits": 3, "max_digits": 3, "ops": "*"}
_INT_RE = re.compile(r"-?[0-9]+")
_EXPRESSION_RE = re.compile(r"[0-9]{1,18}(?:[-+*][0-9]{1,18}){1,31}")  # what render() writes, of sane size
_MAX_ANSWER_CHARS = 1000  # longer "numbers" are junk, and int() refuses > 4300 digits anyway


def evaluate(terms: list[int], ops: list[str]) -> int:
    """Value of terms[0] ops[0] terms[1] ... with * binding tighter than + and -."""
    total, product = 0, terms[0]
    sign = 1
    for op, term in zip(ops, terms[1:]):
        if op == "*":
            product *= term
            continue
        total += sign * product
        sign, product = (1 if op == "+" else -1), term
    return total + sign * product


def render(terms: list[int], ops: list[str]) -> str:
    return str(terms[0]) + "".join(f"{op}{term}" for op, term in zip(ops, terms[1:]))


def parse_int(text: str) -> int | None:
    """The integer written in text (surrounding whitespace and a leading minus allowed), else None."""
    stripped = text.strip()
    if len(stripped) > _MAX_ANSWER_CHARS or not _INT_RE.fullmatch(stripped):
        return None
    return int(stripped)


class ArithmeticTask:
    name = "arithmetic"

    def __init__(self, min_terms: int = 4, max_terms: int = 6, max_digits: int = 1, ops: str = "+",
                 min_digits: int = 1, test_fraction: float = 0.2) -> None:
        if not 2 <= min_terms <= max_terms:
            raise ValueError(f"need 2 <= min_terms <= max_terms, got {min_terms}, {max_terms}")
        if not 1 <= min_digits <= max_digits:
            raise ValueError(f"need 1 <= min_digits <= max_digits, got {min_digits}, {max_digits}")
        if not ops or set(ops) - set("+-*"):
            raise ValueError(f"ops must be a non-empty string of + - *, got {ops!r}")
        self.min_terms, self.max_terms, self.min_digits, self.max_digits = min_terms, max_terms, min_digits, max_digits
        self.ops = sorted(set(ops))  # sorted so that "+-" and "-+" draw the same problems
        self.test_fraction = test_fraction

    def _term(self, rng: random.Random) -> int:
        digits = rng.randint(self.min_digits, self.max_digits)
        return rng.randint(10 ** (digits - 1), 10**digits - 1)

    def _draw(self, rng: random.Random) -> Problem:
        n = rng.randint(self.min_terms, self.max_terms)
        terms = [self._term(rng) for _ in range(n)]
        ops = [rng.choice(self.ops) for _ in range(n - 1)]
        value = evaluate(terms, ops)
        return Problem(prompt=render(terms, ops), answer=str(value), meta={"terms": terms, "ops": ops})

    def problems(self, split: str, n: int, seed: int) -> list[Problem]:
        return draw_unique(self._draw, lambda p: p.prompt, self.test_fraction, split, n, seed)

    def score(self, problem: Problem, answer: str) -> float:
        value = parse_int(answer)
        return 1.0 if value is not None and str(value) == problem.answer.strip() else 0.0

    def canonical(self, answer: str) -> str:
        value = parse_int(answer)
        return str(value) if value is not None else answer.strip()

    def problem_for(self, prompt: str) -> Problem | None:
        """The problem whose prompt this is (an expression as render() writes it), for `r1lab score`; else None."""
        text = prompt.strip()
        if not _EXPRESSION_RE.fullmatch(text):
            return None
        terms, ops = [int(t) for t in re.split(r"[-+*]", text)], re.findall(r"[-+*]", text)
        return Problem(prompt=text, answer=str(evaluate(terms, ops)), meta={"terms": terms, "ops": ops})
