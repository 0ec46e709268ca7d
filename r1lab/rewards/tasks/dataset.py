"""Problems read from a JSONL, JSON or Parquet file (GSM8K, MATH, ...), scored with math-verify. The whole file is
validated when the task is built, each bad row reported as file:line: field; also the train/test split helpers every
task shares."""

from __future__ import annotations

import hashlib
import json
import math
import random
import re
from decimal import Decimal
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from r1lab.rewards.answers import last_boxed
from r1lab.rewards.tasks import hf_datasets
from r1lab.rewards.tasks.base import DatasetError, Problem

PROMPT_FIELDS = ("prompt", "question", "problem")
ANSWER_FIELDS = ("answer", "solution", "final_answer", "reward_model.ground_truth")  # the last: verl's rows
MAX_REPORTED_ERRORS = 10
_STALE_DRAWS = 10_000  # draws without a new problem after which a generator's space counts as exhausted
_SPLITS = ("train", "test")


def raise_row_errors(path: Path, errors: list[str]) -> None:
    """DatasetError listing the first MAX_REPORTED_ERRORS of the errors, if there are any."""
    if errors:
        shown = errors[:MAX_REPORTED_ERRORS]
        more = f"\n... and {len(errors) - len(shown)} more" if len(errors) > len(shown) else ""
        raise DatasetError(f"{len(errors)} bad row(s) in {path}:\n" + "\n".join(shown) + more)


def stable_hash(key: str) -> int:
    """A 64-bit hash of key that is the same on every run and machine, unlike hash()."""
    return int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big")


def in_test_split(key: str, test_fraction: float) -> bool:
    return stable_hash(key) / 2**64 < test_fraction


def _check_split(split: str) -> None:
    if split not in _SPLITS:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")


def draw_unique(draw: Callable[[random.Random], Problem], key: Callable[[Problem], str], test_fraction: float,
                split: str, n: int, seed: int) -> list[Problem]:
    """n distinct problems of split from a generator; repeats only once the split's space is exhausted."""
    _check_split(split)
    rng, found, stale = random.Random(seed), {}, 0  # found: key -> problem, in the order drawn
    while len(found) < n and stale < _STALE_DRAWS:
        problem = draw(rng)
        k = key(problem)
        stale += 1
        if k not in found and in_test_split(k, test_fraction) == (split == "test"):
            found[k] = problem
            stale = 0
    if n > 0 and not found:
        raise ValueError(f"no {split!r} problems could be generated (test_fraction={test_fraction})")
    problems = list(found.values())
    return [problems[i % len(problems)] for i in range(n)]


def extract_reference(answer: str) -> str:
    """Final answer of a reference solution: after the last "####" (GSM8K), else the last \\boxed{}, else all."""
    if "####" in answer:
        return answer.rsplit("####", 1)[1].strip()
    boxed = last_boxed(answer)
    return boxed if boxed is not None else answer.strip()


_NUMBER_RE = re.compile(r"[-+]?(?:[0-9]{1,3}(?:,[0-9]{3})+|[0-9]+)?(?:\.[0-9]+)?")


def plain_number(text: str) -> str | None:
    """"$1,234.50" -> "1234.50"; None unless text is a plain number (currency sign, spaces, and commas allowed, as
    thousands separators only: math-verify would read "1,2" as 1.2)."""
    compact = "".join(text.replace("\\$", "").replace("$", "").split())
    if not compact or not any(c.isdigit() for c in compact) or not _NUMBER_RE.fullmatch(compact):
        return None
    return compact.replace(",", "")


def _normal_number(number: str) -> str:
    """"18.0" -> "18", "0.50" -> "0.5" (number is plain_number's, always a valid Decimal)."""
    value = Decimal(number)
    if value == value.to_integral_value():
        return str(int(value))
    return format(value.normalize(), "f")


@lru_cache(maxsize=8192)
def _parse(text: str) -> tuple:
    """math-verify's parse of an answer, with its own timeout off."""
    parse, _ = _math_verify()
    number = plain_number(text)
    parsed = parse(number if number is not None else text, parsing_timeout=None)
    if not parsed or isinstance(parsed[0], str):
        # Bare LaTeX such as "\frac{1}{2}" or "x^2" is only found between math delimiters.
        parsed = parse(f"${text}$", parsing_timeout=None) or parsed
    return tuple(parsed)


@lru_cache(maxsize=1)
def _math_verify() -> tuple[Callable, Callable]:
    """math-verify's (parse, verify), imported lazily (sympy is slow). Its notice that its timeout is off is silenced:
    r1lab's scorer timeout (rules.py) interrupts a stuck parse."""
    from math_verify import grader, parse, parser, verify

    grader.TIMEOUT_WARNING_SHOWN = parser.TIMEOUT_WARNING_SHOWN = True
    return parse, verify


def math_equal(gold: str, candidate: str) -> bool:
    """Whether candidate is mathematically the gold answer (math-verify), with exact text as a last resort."""
    if not candidate.strip():
        return False
    _, verify = _math_verify()
    gold_parsed, candidate_parsed = _parse(gold), _parse(candidate)
    if not gold_parsed:  # a non-mathematical reference ("yes", a name): compare normalised text
        return canonical_answer(gold) == canonical_answer(candidate)
    return bool(verify(list(gold_parsed), list(candidate_parsed), timeout_seconds=None))


def canonical_answer(answer: str) -> str:
    number = plain_number(answer)
    return _normal_number(number) if number is not None else answer.strip()


def _jsonl_rows(path: Path) -> Iterator[tuple[int, Any, str | None]]:
    """(line number, object, error) for each non-blank line."""
    with path.open("rb") as f:  # bytes, decoded line by line, so that a bad byte is reported with its line
        for number, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8-sig" if number == 1 else "utf-8")  # a byte-order mark is harmless
            except UnicodeDecodeError as e:
                yield number, None, _encoding_error(raw, e)
                continue
            if not line.strip():
                continue
            try:
                # without its line break: an error at the line's end is reported there, not at the next line's start
                yield number, json.loads(line.rstrip("\r\n")), None
            except json.JSONDecodeError as e:
                yield number, None, f"invalid JSON ({e.msg} at column {e.colno})"


def _encoding_error(data: bytes, e: UnicodeDecodeError) -> str:
    column = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
    return f"not valid UTF-8 (byte 0x{data[e.start]:02x} at column {column}; save the file as UTF-8)"


def _json_array_rows(path: Path) -> list[tuple[int, Any, str | None]]:
    """(item number, object, error) for a .json file holding one array of objects."""
    data = path.read_bytes()
    try:
        items = json.loads(data.decode("utf-8-sig"))
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise DatasetError(f"{path}:{line}: {_encoding_error(data, e)}") from None
    except json.JSONDecodeError as e:
        return [(e.lineno, None, f"invalid JSON ({e.msg} at column {e.colno})")]
    if not isinstance(items, list):
        return [(1, None, "a .json file must hold an array of objects (or use JSONL)")]
    return [(number, item, None) for number, item in enumerate(items, start=1)]


def _rows(path: Path) -> Iterable[tuple[int, Any, str | None]]:
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        import pyarrow.parquet as pq  # lazy: only Parquet users pay for the import

        return ((number, row, None) for number, row in enumerate(pq.read_table(path).to_pylist(), start=1))
    if suffix == ".json" and path.read_bytes().removeprefix(b"\xef\xbb\xbf").lstrip().startswith(b"["):
        return _json_array_rows(path)
    return _jsonl_rows(path)


def _pick_field(row: dict, given: str | None, candidates: tuple[str, ...]) -> str:
    if given is not None:
        return given
    return next((name for name in candidates if name in with_nested(row, name)), candidates[0])


def with_nested(row: dict, name: str) -> dict:
    """row with a dotted field's value (verl's reward_model.ground_truth) under its whole name, where it has one."""
    value = row
    for part in name.split(".") if "." in name and name not in row else ():
        if not isinstance(value, dict) or part not in value:
            return row
        value = value[part]
    return row if value is row else {**row, name: value}


def _prompt_messages_error(name: str, messages: list) -> str | None:
    """A conversational prompt's problem: {role, content} messages, system/user/assistant, ending with the user's."""
    if not messages:
        return f"field {name!r} is an empty list of messages"
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str):
            return f"field {name!r} item {i} must be a {{role, content}} message with string content"
        if m.get("role") not in ("system", "user", "assistant"):
            return f"field {name!r} item {i} has role {m.get('role')!r}, not system, user or assistant"
    if messages[-1]["role"] != "user":
        return f"field {name!r}: a conversational prompt must end with the user's message, not {messages[-1]['role']!r}"
    return None


def _field_error(row: dict, name: str, allow_number: bool) -> str | None:
    if name not in row:
        return f"field {name!r} is missing"
    value = row[name]
    if allow_number and isinstance(value, (int, float)) and not isinstance(value, bool):
        # JSON's NaN and Infinity (and Parquet's) would become the reference "nan": answering "nan" would score 1
        finite = not isinstance(value, float) or math.isfinite(value)  # ints are finite, even beyond float range
        return None if finite else f"field {name!r} is {value}, not a finite number"
    if not isinstance(value, str):
        return f"field {name!r} must be a string, got {type(value).__name__}"
    if not value.strip():
        return f"field {name!r} is empty"
    return None


def _non_finite(answer: str) -> bool:
    """Whether answer is NaN or an infinity as float() spells them ("nan", "-Infinity", ...): the words, not a
    long integer (which float() also turns into inf), nor LaTeX's \\infty, a real answer in calculus sets."""
    return answer.strip().lstrip("+-").lower() in ("nan", "inf", "infinity")


class DatasetTask:
    """Problems from a data file. The test split is eval_data's rows when given (the train split is then the whole
    file), else the test_fraction of path's rows picked by a stable hash of the prompt."""

    def __init__(self, path: str | Path, prompt_field: str | None = None, answer_field: str | None = None,
                 test_fraction: float = 0.1, eval_data: str | Path | None = None, subset: str | None = None) -> None:
        self.path = Path(path)
        self.name = self.path.stem
        self.test_fraction = test_fraction
        self.eval_path = Path(eval_data) if eval_data else None
        self._given_fields = (prompt_field, answer_field)
        self.eval_rows = None
        if hf_datasets.is_datasets_source(str(path)):  # a datasets directory or a hub name
            train, test, train_name, test_name = hf_datasets.pick_splits(hf_datasets.load_splits(str(path), subset),
                                                                         str(path))
            self.rows = self._load(Path(f"{path}[{train_name}]"), hf_datasets.dataset_rows(train))
            if test is not None and self.eval_path is None:
                self.eval_path = Path(f"{path}[{test_name}]")
                self.eval_rows = self._load(self.eval_path, hf_datasets.dataset_rows(test))
        elif subset is not None:
            raise DatasetError(f"{path}: task option subset is for hub datasets, not data files")
        else:
            self.rows = self._load(self.path)
        if self.eval_rows is None and self.eval_path is not None:
            self.eval_rows = self._load(self.eval_path)
        self._splits = self._split_rows()

    def _load(self, path: Path, rows: Iterator | None = None) -> list[Problem]:
        """Problems from a data file's rows (or the given rows, named path:row)."""
        if rows is None and not path.is_file():
            raise DatasetError(f"{path}: file not found")
        # Fields as given, else detected on this file's first row (so an eval file may name its columns its way).
        self._prompt_field, self._answer_field = self._given_fields
        problems: list[Problem] = []
        errors: list[str] = []
        for number, row, error in rows if rows is not None else _rows(path):
            if error is None:
                problem, error = self._problem(number, row)
                if problem is not None:
                    problems.append(problem)
            if error is not None:
                errors.append(f"{path}:{number}: {error}")
        if not problems and not errors:
            errors.append(f"{path}: the file has no rows")
        raise_row_errors(path, errors)
        return problems

    def _problem(self, number: int, row: Any) -> tuple[Problem | None, str | None]:
        if not isinstance(row, dict):
            return None, f"row is not a JSON object (got {type(row).__name__})"
        # Fields are detected on the first row and then required on every row, so one schema holds for all.
        self._prompt_field = _pick_field(row, self._prompt_field, PROMPT_FIELDS)
        self._answer_field = _pick_field(row, self._answer_field, ANSWER_FIELDS)
        messages = row.get(self._prompt_field)
        if isinstance(messages, list):  # TRL's conversational prompt
            if error := _prompt_messages_error(self._prompt_field, messages):
                return None, error
            row = {**row, self._prompt_field: messages[-1]["content"]}
        row = with_nested(row, self._answer_field)
        if error := _field_error(row, self._prompt_field, False) or _field_error(row, self._answer_field, True):
            return None, error
        raw = str(row[self._answer_field])
        answer = extract_reference(raw)
        if not answer:
            return None, f"field {self._answer_field!r} has an empty final answer"
        if _non_finite(answer):
            return None, f"field {self._answer_field!r} has the final answer {answer!r}, not a finite number"
        # the row's other columns, for reward functions written for TRL (which passes them as keyword arguments)
        meta = {"row": number, "solution": raw, "columns": {k: v for k, v in row.items() if k != self._prompt_field}}
        conversation = [dict(m) for m in messages] if isinstance(messages, list) else None
        return Problem(prompt=row[self._prompt_field], answer=answer, meta=meta, messages=conversation), None

    def _split_rows(self) -> dict[str, list[Problem]]:
        if self.eval_rows is not None:
            return {"train": self.rows, "test": self.eval_rows}
        if self.test_fraction <= 0:
            return {"train": self.rows, "test": self.rows}
        splits = {"train": [], "test": []}
        for p in self.rows:
            splits["test" if in_test_split(p.prompt, self.test_fraction) else "train"].append(p)
        return splits

    def split_summary(self) -> str:
        """One line saying where the train and test problems come from, for the log at start."""
        train, test = len(self._splits["train"]), len(self._splits["test"])
        if self.eval_rows is not None:
            seen = {p.prompt for p in self.rows}
            shared = sum(p.prompt in seen for p in self.eval_rows)
            overlap = f"; {shared:,} of its prompts are also in the train file" if shared else ""
            return f"train: {train:,} rows (all of {self.path}), test: {test:,} rows (from {self.eval_path}{overlap})"
        if self.test_fraction <= 0:
            return (f"train and test: the same {train:,} rows of {self.path} (test_fraction 0: evaluation is on "
                    "training problems; give eval_data to use your own file)")
        return (f"train: {train:,} rows, test: {test:,} rows ({self.test_fraction * 100:g}% by a stable hash of the "
                "prompt; give eval_data to use your own file)")

    def problems(self, split: str, n: int | None = None, seed: int = 0) -> list[Problem]:
        """n rows of split ("all": every row of the train and eval files, each once) in a seed-determined order,
        cycling when n exceeds the split; all rows for n <= 0."""
        if split == "all":
            rows = list(self.rows) + list(self.eval_rows or [])
        else:
            _check_split(split)
            rows = list(self._splits[split])
        if not rows:
            source = self.eval_path if split == "test" and self.eval_path is not None else self.path
            ways = ("give a file of your own (task option eval_data: FILE); or evaluate every row (eval --split all), "
                    "or train without held-out evaluations (grpo --eval-every 0)") if split == "test" else \
                "lower test_fraction"
            raise DatasetError(f"{source}: the {split!r} split is empty (test_fraction={self.test_fraction} of "
                               f"{len(self.rows):,} rows, by a stable hash of the prompt): {ways}")
        random.Random(seed).shuffle(rows)
        if n is None or n <= 0:
            return rows
        return [rows[i % len(rows)] for i in range(n)]

    def score(self, problem: Problem, answer: str) -> float:
        return 1.0 if math_equal(problem.answer, answer) else 0.0

    def canonical(self, answer: str) -> str:
        return canonical_answer(answer)
