"""Countdown (TinyZero rules): reach a target with + - * / and parentheses, using each given number exactly once.
Each problem is built from a random expression (its reference solution); candidate equations are checked through
`ast` and evaluated with exact fractions, never eval().
"""

from __future__ import annotations

import ast
import operator
import random
import re
from fractions import Fraction

from r1lab.rewards.tasks.base import Problem
from r1lab.rewards.tasks.dataset import draw_unique

MAX_EQUATION_CHARS = 200  # longer candidates are rejected before parsing: nothing legitimate is that long
_ALLOWED_CHARS = set("0123456789+-*/() \t")  # rules out floats, hex/underscore literals, names, strings
_MAX_DRAWS = 10_000
_OPS = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/"}
_APPLY = {"+": operator.add, "-": operator.sub, "*": operator.mul, "/": operator.truediv}

PROMPT = ("Using the numbers {numbers}, create an equation that equals {target}. You can use basic arithmetic "
          "operations (+, -, *, /) and each number can only be used once.")
# PROMPT read back: its numbers (a Python list of ints) and its target
_PROMPT_RE = re.compile(re.escape(PROMPT).replace(re.escape("{numbers}"), r"\[([0-9]{1,9}(?:, [0-9]{1,9}){0,15})\]")
                        .replace(re.escape("{target}"), r"([0-9]{1,9})"))


def _evaluate(node: ast.AST, literals: list[int]) -> Fraction:
    """The exact value of an equation's AST, collecting its int literals; ValueError for anything but ints and
    + - * / (parentheses leave no node)."""
    if isinstance(node, ast.Constant) and type(node.value) is int:  # type() so True/False don't pass
        literals.append(node.value)
        return Fraction(node.value)
    if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
        return _APPLY[_OPS[type(node.op)]](_evaluate(node.left, literals), _evaluate(node.right, literals))
    raise ValueError(f"{type(node).__name__} is not allowed in an equation")


def check_equation(equation: str, numbers: list[int], target: int) -> bool:
    """True iff equation uses each of numbers exactly once and evaluates to target (within 1e-5)."""
    if not isinstance(equation, str) or len(equation) > MAX_EQUATION_CHARS:
        return False
    left, equals, right = equation.strip().partition("=")  # "expr" or "expr = target"
    if equals and right.strip() != str(target):  # also rejects a second "=" and an empty right side
        return False
    if not left.strip() or set(left) - _ALLOWED_CHARS:
        return False
    literals: list[int] = []
    try:
        value = _evaluate(ast.parse(left.strip(), mode="eval").body, literals)
    except (SyntaxError, ValueError, RecursionError, MemoryError, ZeroDivisionError):
        return False
    return sorted(literals) == sorted(numbers) and abs(value - target) < Fraction(1, 100_000)


class CountdownTask:
    name = "countdown"

    def __init__(self, min_numbers: int = 3, max_numbers: int = 4, max_number: int = 99, max_target: int = 1000,
                 test_fraction: float = 0.2) -> None:
        if not 2 <= min_numbers <= max_numbers:
            raise ValueError(f"need 2 <= min_numbers <= max_numbers, got {min_numbers}, {max_numbers}")
        if max_number < 1 or max_target < 1:
            raise ValueError("max_number and max_target must be >= 1")
        self.min_numbers, self.max_numbers = min_numbers, max_numbers
        self.max_number, self.max_target = max_number, max_target
        self.test_fraction = test_fraction

    def _random_solution(self, rng: random.Random, numbers: list[int]) -> tuple[str, Fraction] | None:
        """A random expression using every number once, with its value; None on a division by zero."""
        items = [(str(n), Fraction(n)) for n in numbers]
        while len(items) > 1:
            rng.shuffle(items)
            (a_text, a), (b_text, b) = items.pop(), items.pop()
            op = rng.choice("+-*/")
            if op == "/" and b == 0:
                return None
            items.append((f"({a_text}{op}{b_text})", _APPLY[op](a, b)))
        text, value = items[0]
        return text[1:-1], value  # drop the redundant outer parentheses

    def _draw(self, rng: random.Random) -> Problem:
        for _ in range(_MAX_DRAWS):  # most random expressions land on an integer in range
            numbers = [rng.randint(1, self.max_number) for _ in range(rng.randint(self.min_numbers, self.max_numbers))]
            solution = self._random_solution(rng, numbers)
            if solution and solution[1].denominator == 1 and 1 <= solution[1] <= self.max_target:
                target = int(solution[1])
                prompt = PROMPT.format(numbers=numbers, target=target)
                return Problem(prompt=prompt, answer=solution[0], meta={"numbers": numbers, "target": target})
        raise ValueError(f"no countdown problem found with targets in 1..{self.max_target}; raise max_target")

    @staticmethod
    def _key(problem: Problem) -> str:
        # The same numbers in another order are the same problem: keep them in one split.
        return f"countdown:{sorted(problem.meta['numbers'])}={problem.meta['target']}"

    def problems(self, split: str, n: int, seed: int) -> list[Problem]:
        return draw_unique(self._draw, self._key, self.test_fraction, split, n, seed)

    def score(self, problem: Problem, answer: str) -> float:
        return 1.0 if check_equation(answer, problem.meta["numbers"], problem.meta["target"]) else 0.0

    def canonical(self, answer: str) -> str:
        return "".join(answer.split())

    def problem_for(self, prompt: str) -> Problem | None:
        """The problem whose prompt this is (PROMPT's words), for `r1lab score`; else None. No reference is needed."""
        match = _PROMPT_RE.fullmatch(prompt.strip())
        if match is None:
            return None
        numbers, target = [int(n) for n in match[1].split(", ")], int(match[2])
        return Problem(prompt=prompt.strip(), answer="", meta={"numbers": numbers, "target": target})
