"""Code problems: write a small Python function, run against assert tests in r1lab.rewards.sandbox.runner.

The score is the fraction of tests passed (partial credit; `correct` and pass@k count only full marks), on the answer
with its Markdown fence stripped. `--task code` draws problems from FAMILIES with random parameters, the tests
computed from a reference solution, split by a hash of the family and its parameters; with task option `path`, a
JSONL/JSON/Parquet file gives one problem a row: {"prompt", "tests": [assert statements], "entry_point" (optional:
tests may then call it `candidate`), "solution" (optional)}, each test checked by r1lab.rewards.sandbox.judge at load.
"""

from __future__ import annotations

import ast
import copy
import keyword
import random
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable

from r1lab.rewards.sandbox.judge import UnjudgeableTestError, split_test
from r1lab.rewards.sandbox.runner import run_tests
from r1lab.rewards.tasks.base import Problem
from r1lab.rewards.tasks.dataset import DatasetTask, _field_error, draw_unique, stable_hash

DEFAULT_TIMEOUT_S = 2.0  # all tests of one answer; below GRPOConfig.reward_timeout_s (5 s) with room to spare
_MAX_EXAMPLE_CHARS = 70  # the example test shown in the prompt
MAX_CANONICAL_CHARS = 20_000  # longer answers are voted on as plain text rather than parsed
_FENCE_RE = re.compile(r"```[ \t]*(?:python3?|py)?[ \t]*\n(.*?)(?:```|\Z)", re.DOTALL | re.IGNORECASE)


def strip_fences(answer: str) -> str:
    """The code inside the first ``` / ```python fence of answer, or answer itself when it has no fence."""
    match = _FENCE_RE.search(answer)
    return (match.group(1) if match else answer).strip("\n")


def canonical_code(answer: str) -> str:
    """The code with formatting and comments normalised (ast round trip), for majority voting; still runnable."""
    code = strip_fences(answer)
    if len(code) <= MAX_CANONICAL_CHARS:
        try:
            return ast.unparse(ast.parse(code))
        except Exception:  # SyntaxError, RecursionError or MemoryError on hostile nesting: vote on the text
            pass
    return "\n".join(line.rstrip() for line in code.strip().splitlines())


@dataclass(frozen=True)
class Family:
    """One kind of problem. describe and solution are str.format templates over the drawn params."""

    name: str
    describe: str  # completes "Write a Python function `signature` that ..."
    solution: str  # reference code, "def f(xs):\n ...", formatted with params
    params: Callable[[random.Random], dict]
    args: Callable[[random.Random], tuple]  # the arguments of one test call

    @property
    def signature(self) -> str:
        """"sum_multiples(xs)": the function to write, as the solution defines it."""
        return self.solution[len("def "):self.solution.index(":")]

    @property
    def entry_point(self) -> str:
        return self.signature.partition("(")[0]


def _ints(rng: random.Random, lo: int = -20, hi: int = 20, n_max: int = 8) -> list[int]:
    return [rng.randint(lo, hi) for _ in range(rng.randint(0, n_max))]


def _word(rng: random.Random, letters: str = "abcdeiou", n_max: int = 6) -> str:
    return "".join(rng.choice(letters) for _ in range(rng.randint(1, n_max)))


def _words(rng: random.Random, n_max: int = 6) -> list[str]:
    return [_word(rng, "abcdefghilmnoprstu") for _ in range(rng.randint(0, n_max))]


def _bounds(rng: random.Random, lo_min: int, lo_max: int, max_width: int) -> dict:
    lo = rng.randint(lo_min, lo_max)
    return {"lo": lo, "hi": lo + rng.randint(0, max_width)}


FAMILIES: tuple[Family, ...] = (
    Family("sum_multiples", "returns the sum of the numbers in the list xs that are divisible by {k}",
           "def sum_multiples(xs):\n    return sum(x for x in xs if x % {k} == 0)\n",
           lambda r: {"k": r.randint(2, 12)}, lambda r: (_ints(r, -50, 50),)),
    Family("count_above", "returns how many numbers in the list xs are greater than {t}",
           "def count_above(xs):\n    return sum(1 for x in xs if x > {t})\n",
           lambda r: {"t": r.randint(-30, 30)}, lambda r: (_ints(r, -40, 40, 10),)),
    Family("multiples", "returns the list of the first n positive multiples of {k}, in increasing order",
           "def multiples(n):\n    return [{k} * i for i in range(1, n + 1)]\n",
           lambda r: {"k": r.randint(2, 40)}, lambda r: (r.randint(0, 9),)),
    Family("join_reversed",
           "returns the words of the string s (separated by spaces) in reverse order, joined by {sep!r}",
           "def join_reversed(s):\n    return {sep!r}.join(reversed(s.split()))\n",
           lambda r: {"sep": r.choice([" ", "-", ",", "+", "/", "::", "_", ", ", " | "])},
           lambda r: (" ".join(_words(r)),)),
    Family("count_chars", "returns how many characters of the string s are one of {chars!r}",
           "def count_chars(s):\n    return sum(1 for c in s if c in {chars!r})\n",
           lambda r: {"chars": "".join(sorted(r.sample("abcdeiou", r.randint(1, 4))))},
           lambda r: (_word(r, "abcdeiou xyz", 14),)),
    Family("sum_largest",
           "returns the sum of the {k} largest numbers in the list xs (of all of them if xs has fewer than {k})",
           "def sum_largest(xs):\n    return sum(sorted(xs, reverse=True)[:{k}])\n",
           lambda r: {"k": r.randint(1, 5)}, lambda r: (_ints(r, -30, 30, 9),)),
    Family("fizz",
           "returns a list of strings for the numbers 1 to n: {wa!r} for multiples of {a}, {wb!r} for multiples "
           "of {b}, {wa!r} followed by {wb!r} for multiples of both, and the number itself (as a string) otherwise",
           "def fizz(n):\n    out = []\n    for i in range(1, n + 1):\n"
           "        s = ({wa!r} if i % {a} == 0 else '') + ({wb!r} if i % {b} == 0 else '')\n"
           "        out.append(s or str(i))\n    return out\n",
           lambda r: {"a": r.randint(2, 4), "b": r.randint(5, 7), "wa": r.choice(["Fizz", "Foo", "Ping"]),
                      "wb": r.choice(["Buzz", "Bar", "Pong"])},
           lambda r: (r.randint(0, 16),)),
    Family("running_total",
           "returns the list of running totals of the list xs, starting from {s}: element i is {s} plus "
           "xs[0] + ... + xs[i]",
           "def running_total(xs):\n    out, total = [], {s}\n    for x in xs:\n        total += x\n"
           "        out.append(total)\n    return out\n",
           lambda r: {"s": r.randint(-10, 10)}, lambda r: (_ints(r),)),
    Family("caesar",
           "shifts every lowercase letter of the string s forward by {k} places in the alphabet (z wraps round "
           "to a) and returns the result; other characters stay as they are",
           "def caesar(s):\n"
           "    return ''.join(chr((ord(c) - 97 + {k}) % 26 + 97) if 'a' <= c <= 'z' else c for c in s)\n",
           lambda r: {"k": r.randint(1, 25)}, lambda r: (_word(r, "abcxyz ABZ!", 12),)),
    Family("digit_power_sum",
           "returns the sum of the decimal digits of the non-negative integer n, each raised to the power {p}",
           "def digit_power_sum(n):\n    return sum(int(d) ** {p} for d in str(n))\n",
           lambda r: {"p": r.randint(1, 5)}, lambda r: (r.randint(0, 99999),)),
    Family("clamp",
           "returns the list xs with every number below {lo} replaced by {lo} and every number above {hi} "
           "replaced by {hi}",
           "def clamp(xs):\n    return [min(max(x, {lo}), {hi}) for x in xs]\n",
           lambda r: _bounds(r, -15, 10, 20), lambda r: (_ints(r, -30, 30),)),
    Family("chunks",
           "splits the list xs into consecutive pieces of length {k} (the last one may be shorter) and returns "
           "the list of pieces, each a list",
           "def chunks(xs):\n    return [xs[i:i + {k}] for i in range(0, len(xs), {k})]\n",
           lambda r: {"k": r.randint(1, 5)}, lambda r: (_ints(r, 0, 9, 11),)),
    Family("longest_run_above",
           "returns the length of the longest run of consecutive elements of the list xs that are all greater "
           "than {t} (0 if there is none)",
           "def longest_run_above(xs):\n    best = run = 0\n    for x in xs:\n"
           "        run = run + 1 if x > {t} else 0\n        best = max(best, run)\n    return best\n",
           lambda r: {"t": r.randint(-5, 5)}, lambda r: (_ints(r, -10, 10, 12),)),
    Family("word_lengths",
           "returns a dict that maps each distinct word of the string s (words are separated by spaces) with at "
           "least {k} letters to its length",
           "def word_lengths(s):\n    return {{w: len(w) for w in s.split() if len(w) >= {k}}}\n",
           lambda r: {"k": r.randint(1, 5)}, lambda r: (" ".join(_words(r, 7)),)),
    Family("count_primes", "returns how many prime numbers p satisfy {a} <= p <= n",
           "def count_primes(n):\n    count = 0\n    for p in range(max({a}, 2), n + 1):\n"
           "        if all(p % d for d in range(2, int(p ** 0.5) + 1)):\n            count += 1\n"
           "    return count\n",
           lambda r: {"a": r.randint(0, 30)}, lambda r: (r.randint(0, 120),)),
    Family("rotate",
           "returns the list xs rotated right by {k} places (the last {k} elements move to the front, wrapping "
           "around when xs has fewer than {k} elements); an empty list stays empty",
           "def rotate(xs):\n    if not xs:\n        return []\n    k = {k} % len(xs)\n"
           "    return xs[len(xs) - k:] + xs[:len(xs) - k]\n",
           lambda r: {"k": r.randint(1, 9)}, lambda r: (_ints(r, 0, 9),)),
    Family("starting_with", "returns the strings of the list words that start with {c!r}, in their original order",
           "def starting_with(words):\n    return [w for w in words if w.startswith({c!r})]\n",
           lambda r: {"c": r.choice("abcdeilmoprstu")}, lambda r: (_words(r, 8),)),
    Family("small_steps",
           "returns True if each element of the list xs differs from the one before it by at most {d} (in "
           "absolute value), and False otherwise; lists with fewer than two elements give True",
           "def steps_ok(xs):\n    return all(abs(b - a) <= {d} for a, b in zip(xs, xs[1:]))\n",
           lambda r: {"d": r.randint(0, 6)}, lambda r: ([r.randint(0, 12) for _ in range(r.randint(0, 6))],)),
)
FAMILY_NAMES = tuple(f.name for f in FAMILIES)


@lru_cache(maxsize=65536)
def _build(family_index: int, params_key: tuple, n_tests: int) -> Problem:
    """The problem of a family and its params, its tests drawn from a seed hashed from both (the same on every run)."""
    family, params = FAMILIES[family_index], dict(params_key)
    solution = family.solution.format(**params)
    namespace: dict[str, Any] = {}
    exec(solution, namespace)  # our own reference code, not model output
    reference = namespace[family.entry_point]
    rng = random.Random(stable_hash(f"{family.name}:{params_key}"))
    tests, examples = [], []
    for _ in range(n_tests):
        args = family.args(rng)
        expected = reference(*copy.deepcopy(args))
        call = f"{family.entry_point}({', '.join(repr(a) for a in args)})"
        tests.append(f"assert strict_equal({call}, {expected!r})")
        examples.append(f"{call} == {expected!r}")
    shown = [e for e in examples if len(e) <= _MAX_EXAMPLE_CHARS] or [min(examples, key=len)]
    prompt = (f"Write a Python function `{family.signature}` that {family.describe.format(**params)}.\n"
              f"For example, {max(shown, key=len)}.")  # the longest short one: an empty list shows little
    meta = {"family": family.name, "params": params, "tests": tests, "entry_point": family.entry_point,
            "solution": solution}
    return Problem(prompt=prompt, answer=solution, meta=meta)


class _Scorer:
    """The scoring shared by generated and file problems: the tests of meta, run on the fence-stripped answer."""

    timeout_s: float
    memory_mb: int
    answers_are_code = True  # the boxed format reads the whole text after </think> (r1lab/rewards/answers.py)

    def score(self, problem: Problem, answer: str) -> float:
        # tests may call the function as candidate(...): the judge maps that name to the entry point
        return run_tests(strip_fences(answer), problem.meta["tests"], entry_point=problem.meta.get("entry_point"),
                         timeout_s=self.timeout_s, memory_mb=self.memory_mb).fraction

    def canonical(self, answer: str) -> str:
        return canonical_code(answer)


class CodeTask(_Scorer):
    """The built-in generator: small Python function problems from FAMILIES."""

    name = "code"

    def __init__(self, families: list[str] | None = None, tests_per_problem: int = 6, test_fraction: float = 0.2,
                 timeout_s: float = DEFAULT_TIMEOUT_S, memory_mb: int = 256) -> None:
        unknown = set(families or ()) - set(FAMILY_NAMES)
        if unknown:
            raise ValueError(f"unknown code families {sorted(unknown)}: use some of {', '.join(FAMILY_NAMES)}")
        if tests_per_problem < 1:
            raise ValueError(f"tests_per_problem must be at least 1, got {tests_per_problem}")
        self.family_indices = [i for i, f in enumerate(FAMILIES) if not families or f.name in families]
        self.tests_per_problem, self.test_fraction = tests_per_problem, test_fraction
        self.timeout_s, self.memory_mb = timeout_s, memory_mb

    def _draw(self, rng: random.Random) -> Problem:
        index = rng.choice(self.family_indices)
        params = FAMILIES[index].params(rng)
        return _build(index, tuple(sorted(params.items())), self.tests_per_problem)

    def problems(self, split: str, n: int, seed: int) -> list[Problem]:
        key = lambda p: f"{p.meta['family']}:{sorted(p.meta['params'].items())}"  # noqa: E731
        return draw_unique(self._draw, key, self.test_fraction, split, n, seed)


def _tests_error(row: dict) -> str | None:
    tests = row.get("tests")
    if "tests" not in row:
        return "field 'tests' is missing"
    if not isinstance(tests, list) or not tests:
        return "field 'tests' must be a non-empty list of assert statements"
    entry_point = row.get("entry_point") if isinstance(row.get("entry_point"), str) else None
    for i, test in enumerate(tests):
        if not isinstance(test, str) or not test.strip():
            return f"field 'tests' item {i} must be a non-empty string"
        try:
            split_test(test.strip(), entry_point)  # parsing runs nothing
        except UnjudgeableTestError as e:
            return f"field 'tests' item {i} {e}"
    return None


def _entry_point_error(row: dict) -> str | None:
    entry_point = row.get("entry_point")
    if entry_point is None:
        return None
    if not isinstance(entry_point, str) or not entry_point.isidentifier() or keyword.iskeyword(entry_point):
        return f"field 'entry_point' must be a Python function name, got {entry_point!r}"
    return None


class CodeFileTask(_Scorer, DatasetTask):
    """Code problems read from a file; a DatasetTask, so the trainer walks it in shuffled epochs like other files."""

    def __init__(self, path: str | Path, test_fraction: float = 0.1, timeout_s: float = DEFAULT_TIMEOUT_S,
                 memory_mb: int = 256) -> None:
        self.timeout_s, self.memory_mb = timeout_s, memory_mb
        super().__init__(path, prompt_field="prompt", answer_field="solution", test_fraction=test_fraction)
        self.name = f"code:{self.path.stem}"

    def _problem(self, number: int, row: Any) -> tuple[Problem | None, str | None]:
        if not isinstance(row, dict):
            return None, f"row is not a JSON object (got {type(row).__name__})"
        error = _field_error(row, "prompt", allow_number=False) or _tests_error(row) or _entry_point_error(row)
        if error is None and "solution" in row:
            error = _field_error(row, "solution", allow_number=False)
        if error is not None:
            return None, error
        meta = {"row": number, "tests": [t.strip() for t in row["tests"]], "entry_point": row.get("entry_point")}
        return Problem(prompt=row["prompt"], answer=row.get("solution", ""), meta=meta), None


def code_task(path: str | Path | None = None, **options: Any) -> CodeTask | CodeFileTask:
    """The "code" task: problems from a file when a path is given, else the built-in generator."""
    return CodeFileTask(path, **options) if path is not None else CodeTask(**options)
