"""Tasks: generators, splits, scorers and dataset validation."""

from __future__ import annotations

import json
import re
import signal
from pathlib import Path

import pytest

from r1lab.rewards.tasks import DatasetError, DatasetTask, get_task
from r1lab.rewards.tasks.arithmetic import ArithmeticTask
from r1lab.rewards.tasks.base import Problem
from r1lab.rewards.tasks.countdown import CountdownTask
from r1lab.rewards.tasks.dataset import canonical_answer, extract_reference, math_equal

GSM8K_TEST = Path(__file__).resolve().parents[2] / "shared/data/gsm8k/test.jsonl"


# ---------------------------------------------------------------- registry


def test_get_task() -> None:
    assert get_task("arithmetic", ops="+-").ops == ["+", "-"]
    assert get_task("countdown").name == "countdown"
    assert get_task("code").name == "code"
    with pytest.raises(ValueError, match="arithmetic, code, countdown"):
        get_task("gsm9k")


# ---------------------------------------------------------------- arithmetic


def test_arithmetic_problem_shape() -> None:
    for p in ArithmeticTask(ops="+-*", max_digits=2).problems("train", 50, seed=1):
        assert p.prompt == "".join(
            [str(p.meta["terms"][0])] + [o + str(t) for o, t in zip(p.meta["ops"], p.meta["terms"][1:])]
        )
        assert " " not in p.prompt and "=" not in p.prompt
        assert int(p.answer) == eval(p.prompt)  # eval is fine on the test's own trusted expressions
        assert all(1 <= t <= 99 for t in p.meta["terms"])


def test_arithmetic_splits_disjoint_and_deterministic() -> None:
    task = ArithmeticTask(ops="+-*")
    train = task.problems("train", 2000, seed=0)
    test = task.problems("test", 500, seed=0)
    assert not {p.prompt for p in train} & {p.prompt for p in test}
    prompts = lambda seed: [p.prompt for p in task.problems("train", 50, seed=seed)]  # noqa: E731
    assert prompts(3) == prompts(3) != prompts(4)
    assert len({p.prompt for p in train}) == len(train)  # no duplicates while the space is large


def test_arithmetic_small_space_terminates_with_repeats() -> None:
    task = ArithmeticTask(min_terms=2, max_terms=2)  # 81 expressions in all
    problems = task.problems("test", 100, seed=0)
    assert len(problems) == 100 and len({p.prompt for p in problems}) < 81
    with pytest.raises(ValueError):
        ArithmeticTask(test_fraction=0.0).problems("test", 5, seed=0)


@pytest.mark.parametrize(
    "answer, expected", [(" 21 ", 1.0), ("21", 1.0), ("21.0", 0.0), ("+21", 0.0), ("", 0.0), ("2 1", 0.0), ("x", 0.0)]
)
def test_arithmetic_score(answer: str, expected: float) -> None:
    assert ArithmeticTask().score(Problem("10+11", "21"), answer) == expected


def test_arithmetic_negative_and_canonical() -> None:
    task = ArithmeticTask()
    assert task.score(Problem("1-4", "-3"), "-3") == 1.0
    assert task.score(Problem("1-4", "-3"), "3") == 0.0
    assert task.canonical(" 007 ") == "7" and task.canonical(" seven ") == "seven"


# ---------------------------------------------------------------- countdown

CD = Problem("", "", {"numbers": [19, 36, 55, 7], "target": 65})


@pytest.mark.parametrize(
    "equation, expected",
    [
        ("55 + 36 - 7 - 19", 1.0),
        ("(55 + 36) - (7 + 19)", 1.0),
        ("55 + 36 - 7 - 19 = 65", 1.0),
        ("55 + 36 - 7 - 19 = 64", 0.0),
        ("55 + 36 - 7 - 19 = 65 = 65", 0.0),
        ("55 + 36 - 7 - 7", 0.0),  # 7 reused, 19 missing
        ("55 + 36 - 7", 0.0),  # 19 missing
        ("55 + 36 - 7 - 19 + 0", 0.0),  # extra number
        ("55 + 36 - 7 + 19", 0.0),  # wrong value
        ("55 + 36 - 7 - 19 ** 1", 0.0),
        ("55 + 36 - 7 - 19 // 1", 0.0),
        ("55 + 36 % 7 - 19", 0.0),
        ("-19 + 55 + 36 - 7", 0.0),  # unary minus
        ("55.0 + 36 - 7 - 19", 0.0),
        ("__import__('os')", 0.0),
        ("abs(55) + 36 - 7 - 19", 0.0),
        ("", 0.0),
        ("55 +", 0.0),
        ("(" * 300 + "1" + ")" * 300, 0.0),
    ],
)
def test_countdown_score(equation: str, expected: float) -> None:
    assert CountdownTask().score(CD, equation) == expected


def test_countdown_division_exact_and_by_zero() -> None:
    task = CountdownTask()
    thirds = Problem("", "", {"numbers": [7, 3, 3], "target": 7})
    assert task.score(thirds, "7 / 3 * 3") == 1.0  # exact fractions: 7/3*3 is 7, not 6.999...
    zero = Problem("", "", {"numbers": [5, 5, 1], "target": 1})
    assert task.score(zero, "1 / (5 - 5)") == 0.0


def test_countdown_generated_problems_are_solvable() -> None:
    task = CountdownTask()
    problems = task.problems("train", 200, seed=0)
    for p in problems:
        assert task.score(p, p.answer) == 1.0
        assert 1 <= p.meta["target"] <= 1000 and 3 <= len(p.meta["numbers"]) <= 4
        assert str(p.meta["numbers"]) in p.prompt and f"equals {p.meta['target']}." in p.prompt
    test = task.problems("test", 100, seed=0)
    key = lambda p: (tuple(sorted(p.meta["numbers"])), p.meta["target"])  # noqa: E731
    assert not {key(p) for p in problems} & {key(p) for p in test}
    assert task.canonical(" 1 + 2 ") == "1+2"


# ---------------------------------------------------------------- dataset: GSM8K


@pytest.fixture(scope="module")
def gsm8k() -> DatasetTask:
    if not GSM8K_TEST.is_file():
        pytest.skip(f"{GSM8K_TEST} not present")
    return DatasetTask(GSM8K_TEST, test_fraction=0.0)


def test_gsm8k_loads_all_rows(gsm8k: DatasetTask) -> None:
    assert gsm8k.name == "test"
    assert len(gsm8k.problems("test", 0, seed=0)) == 1319
    first = next(p for p in gsm8k.rows if p.meta["row"] == 1)
    assert first.answer == "18" and first.prompt.startswith("Janet")


def test_gsm8k_reference_scores_itself(gsm8k: DatasetTask) -> None:
    for p in gsm8k.rows[:100]:
        assert gsm8k.score(p, p.answer) == 1.0, p.answer
        wrong = str(int(p.answer.replace(",", "")) + 1)
        assert gsm8k.score(p, wrong) == 0.0, p.answer


def test_dataset_splits(gsm8k: DatasetTask) -> None:
    task = DatasetTask(GSM8K_TEST, test_fraction=0.2)
    train, test = task.problems("train", None, 0), task.problems("test", None, 0)
    assert len(train) + len(test) == 1319 and 150 < len(test) < 380
    assert not {p.prompt for p in train} & {p.prompt for p in test}
    assert [p.prompt for p in task.problems("test", 5, 1)] == [p.prompt for p in task.problems("test", 5, 1)]
    assert len(task.problems("test", 1000, 1)) == 1000  # cycles past the split size


# ---------------------------------------------------------------- dataset: scoring

@pytest.mark.parametrize(
    "gold, candidate, expected",
    [
        ("18", "18", 1.0),
        ("18", "$18", 1.0),
        ("18", "\\$18", 1.0),
        ("18", "18.0", 1.0),
        ("18", "19", 0.0),
        ("18", "", 0.0),
        ("18", "   ", 0.0),
        ("1,000", "1000", 1.0),
        ("1000", "1,000", 1.0),
        ("-5", "- 5", 1.0),
        ("0.5", "\\frac{1}{2}", 1.0),
        ("\\frac{1}{2}", "0.5", 1.0),
        ("x^2", "x^2", 1.0),
        ("yes", " yes ", 1.0),
    ],
)
def test_math_scoring(gold: str, candidate: str, expected: float) -> None:
    assert float(math_equal(gold, candidate)) == expected


def test_math_verify_runs_without_its_own_alarm(monkeypatch: pytest.MonkeyPatch) -> None:
    # rewards.py times scorers out with SIGALRM; a nested alarm inside math-verify would cancel that timer.
    def no_alarm(*args: object) -> None:
        raise AssertionError("math-verify set an alarm")

    monkeypatch.setattr(signal, "alarm", no_alarm)
    assert math_equal("\\frac{3}{7}", "3/7") and not math_equal("123457", "123456")


@pytest.mark.slow
@pytest.mark.parametrize("rank, notices", [(None, 0), ("0", 0), ("1", 0)])
def test_math_verifys_timeout_notice_is_not_shown_to_users(rank: str | None, notices: int) -> None:
    # parse and verify would each print it once per process, telling the caller to interrupt a stuck parse itself:
    # r1lab's scorer timeout does, and a user could do nothing about it
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    env.update({"RANK": rank, "WORLD_SIZE": "2"} if rank is not None else {})
    code = ("from r1lab.rewards.tasks.dataset import math_equal\n"
            "assert math_equal('1/2', '0.5') and math_equal('3', '3') and not math_equal('x^2', 'x^3')")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert (r.stdout + r.stderr).count("Timeout is disabled") == notices, r.stderr


def test_boxed_reference_vs_decimal(tmp_path: Path) -> None:
    path = tmp_path / "math.jsonl"
    path.write_text(json.dumps({"problem": "half?", "solution": "It is $\\boxed{\\frac{1}{2}}$."}) + "\n")
    task = DatasetTask(path, test_fraction=0.0)
    (problem,) = task.problems("train", 0, 0)
    assert problem.answer == "\\frac{1}{2}"
    assert task.score(problem, "0.5") == 1.0 and task.score(problem, "0.25") == 0.0


@pytest.mark.parametrize(
    "text, expected",
    [
        ("work\n#### 1,234", "1,234"),
        ("a #### 1 #### 2 ", "2"),
        ("so \\boxed{\\frac{1}{\\sqrt{2}}} and \\boxed{3}", "3"),
        ("\\fbox{x^{2}}", "x^{2}"),
        ("\\boxed{unbalanced", "\\boxed{unbalanced"),
        (" 42 ", "42"),
    ],
)
def test_extract_reference(text: str, expected: str) -> None:
    assert extract_reference(text) == expected


def test_canonical_numbers() -> None:
    assert [canonical_answer(a) for a in ["1,234", "$18", "18.0", "0.50", " x "]] == ["1234", "18", "18", "0.5", "x"]


# ---------------------------------------------------------------- dataset: validation


def _write(tmp_path: Path, lines: list[str], name: str = "train.jsonl") -> Path:
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n")
    return path


def test_missing_field_names_file_line_field(tmp_path: Path) -> None:
    path = _write(tmp_path, ['{"question": "a", "answer": "1"}', "", '{"question": "b"}'])
    with pytest.raises(DatasetError, match=re.escape(f"{path}:3: field 'answer' is missing")):
        DatasetTask(path)


def test_bad_json_and_bad_types_reported_together(tmp_path: Path) -> None:
    lines = [
        '{"prompt": "a", "answer": 1}',
        "{not json",
        '{"prompt": 5, "answer": "2"}',
        "[1, 2]",
        '{"prompt": "c", "answer": " "}',
        '{"prompt": "d", "answer": ',  # cut off: the error is at this line's end, not at the next line's start
    ]
    path = _write(tmp_path, lines)
    with pytest.raises(DatasetError) as info:
        DatasetTask(path)
    message = str(info.value)
    assert f"{path}:2: invalid JSON" in message
    assert f"{path}:3: field 'prompt' must be a string, got int" in message
    assert f"{path}:4: row is not a JSON object" in message
    assert f"{path}:5: field 'answer' is empty" in message
    assert f"{path}:6: invalid JSON (Expecting value at column 27)" in message


def test_many_errors_are_capped(tmp_path: Path) -> None:
    path = _write(tmp_path, ['{"prompt": "a"}'] * 25)
    with pytest.raises(DatasetError, match="and 15 more"):
        DatasetTask(path)


def test_empty_file_is_an_error(tmp_path: Path) -> None:
    path = _write(tmp_path, ["", "  "])
    with pytest.raises(DatasetError, match="no rows"):
        DatasetTask(path)
    with pytest.raises(DatasetError, match="not found"):
        DatasetTask(tmp_path / "missing.jsonl")


def test_numeric_answers_and_explicit_fields(tmp_path: Path) -> None:
    path = _write(tmp_path, ['{"q": "a", "a": 3}', '{"q": "b", "a": 4.5}'])
    task = get_task(str(path), prompt_field="q", answer_field="a", test_fraction=0.0)
    assert sorted(p.answer for p in task.problems("train", 0, 0)) == ["3", "4.5"]


def test_parquet_round_trip(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    path = tmp_path / "data.parquet"
    pq.write_table(pa.table({"question": ["one plus one?", "two plus two?"], "answer": ["#### 2", "#### 4"]}), path)
    task = get_task(str(path), test_fraction=0.0)
    assert task.name == "data"
    rows = sorted((p.prompt, p.answer) for p in task.problems("train", 0, 0))
    assert rows == [("one plus one?", "2"), ("two plus two?", "4")]
    pq.write_table(pa.table({"question": ["q"], "answer": [""]}), path)
    with pytest.raises(DatasetError, match=re.escape(f"{path}:1: field 'answer' is empty")):
        DatasetTask(path)


def test_verl_rows_are_read_as_they_are(tmp_path: Path) -> None:
    """verl's parquet rows: a conversational prompt and the answer in reward_model.ground_truth, found without
    options; a row without it (None in a Parquet struct) is named."""
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    path = tmp_path / "train.parquet"
    row = lambda q, truth: {"data_source": "openai/gsm8k", "prompt": [{"role": "user", "content": q}],  # noqa: E731
                            "ability": "math", "reward_model": {"style": "rule", "ground_truth": truth}}
    pq.write_table(pa.Table.from_pylist([row("one plus one?", "2"), row("two plus two?", "4")]), path)
    task = get_task(str(path), test_fraction=0.0)
    assert sorted((p.prompt, p.answer) for p in task.problems("train", 0, 0)) == [("one plus one?", "2"),
                                                                                 ("two plus two?", "4")]
    pq.write_table(pa.Table.from_pylist([row("q", "2"), {**row("r", "3"), "reward_model": {"style": "rule"}}]), path)
    with pytest.raises(DatasetError, match=re.escape(f"{path}:2: field 'reward_model.ground_truth' must be a string, got NoneType")):
        DatasetTask(path)


@pytest.mark.parametrize("answer, shown", [
    ("NaN", "is nan, not a finite number"), ("Infinity", "is inf, not a finite number"),
    ("-Infinity", "is -inf, not a finite number"),
    ('"nan"', "has the final answer 'nan', not a finite number"),
    ('"-inf"', "has the final answer '-inf', not a finite number"),
    ('"The limit diverges. #### Infinity"', "has the final answer 'Infinity', not a finite number"),
    ('"#### "', "has an empty final answer"), ('""', "is empty"), ("null", "must be a string, got NoneType"),
])
def test_non_finite_and_empty_answers_are_refused_at_load(tmp_path: Path, answer: str, shown: str) -> None:
    path = _write(tmp_path, ['{"prompt": "a", "answer": "1"}', f'{{"prompt": "b", "answer": {answer}}}'])
    with pytest.raises(DatasetError, match=re.escape(f"{path}:2: field 'answer' {shown}")):
        DatasetTask(path)


def test_infinity_in_latex_and_huge_integers_are_answers(tmp_path: Path) -> None:
    path = _write(tmp_path, ['{"prompt": "a", "answer": "\\\\infty"}', '{"prompt": "b", "answer": ' + "9" * 400 + "}"])
    task = DatasetTask(path, test_fraction=0.0)
    assert sorted(p.answer for p in task.rows) == ["9" * 400, "\\infty"]


def test_a_nan_reference_no_longer_rewards_answering_nan(tmp_path: Path) -> None:
    path = _write(tmp_path, ['{"prompt": "a", "answer": NaN}'])
    with pytest.raises(DatasetError):
        DatasetTask(path)  # before: the reference was "nan", and the answer "nan" scored 1.0


def test_bad_bytes_are_reported_with_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"prompt": "a", "answer": "1"}\n{"prompt": "caf\xe9", "answer": "2"}\n'
                     b'{"prompt": "ok", "answer": "3"}\n{"prompt": "\xff", "answer": "4"}\n')
    with pytest.raises(DatasetError) as info:
        DatasetTask(path)
    message = str(info.value)
    assert "2 bad row(s)" in message
    assert f"{path}:2: not valid UTF-8 (byte 0xe9 at column 16" in message
    assert f"{path}:4: not valid UTF-8 (byte 0xff at column 13" in message
    array = tmp_path / "rows.json"
    array.write_bytes(b'[\n {"prompt": "a", "answer": "1"},\n {"prompt": "caf\xe9", "answer": "2"}\n]\n')
    with pytest.raises(DatasetError, match=re.escape(f"{array}:3: not valid UTF-8 (byte 0xe9 at column 17")):
        DatasetTask(array)


def test_a_byte_order_mark_is_fine(tmp_path: Path) -> None:
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"prompt": "a", "answer": "1"}\n')
    assert DatasetTask(path, test_fraction=0.0).rows[0].answer == "1"
    array = tmp_path / "bom.json"
    array.write_bytes(b'\xef\xbb\xbf[{"prompt": "a", "answer": "1"}]')
    assert DatasetTask(array, test_fraction=0.0).rows[0].answer == "1"


# ---------------------------------------------------------------- dataset: the test split


def _problems_file(tmp_path: Path, name: str, n: int, start: int = 0, field: str = "question") -> Path:
    return _write(tmp_path, [json.dumps({field: f"What is {i}+1?", "answer": str(i + 1)})
                             for i in range(start, start + n)], name)


def test_eval_data_is_the_test_split_and_the_whole_file_trains(tmp_path: Path) -> None:
    train = _problems_file(tmp_path, "train.jsonl", 40)
    test = _problems_file(tmp_path, "test.jsonl", 7, start=38, field="problem")  # its own column name
    task = get_task(str(train), eval_data=str(test))
    assert sorted(p.prompt for p in task.problems("train", 0, 0)) == sorted(p.prompt for p in task.rows)
    assert len(task.problems("train", 0, 0)) == 40
    assert [p.meta["row"] for p in sorted(task.problems("test", 0, 0), key=lambda p: p.meta["row"])] == list(
        range(1, 8))
    assert {p.prompt for p in task.problems("test", 0, 0)} == {f"What is {i}+1?" for i in range(38, 45)}
    assert task.split_summary() == (f"train: 40 rows (all of {train}), test: 7 rows (from {test}; 2 of its "
                                    "prompts are also in the train file)")


def test_default_split_is_summarised_with_its_counts(tmp_path: Path) -> None:
    train = _problems_file(tmp_path, "train.jsonl", 200)
    task = DatasetTask(train)
    n_test = len(task.problems("test", 0, 0))
    assert 5 < n_test < 40 and n_test + len(task.problems("train", 0, 0)) == 200
    assert task.split_summary() == (f"train: {200 - n_test} rows, test: {n_test} rows (10% by a stable hash of the "
                                    "prompt; give eval_data to use your own file)")
    assert "the same 200 rows" in DatasetTask(train, test_fraction=0.0).split_summary()
    assert DatasetTask(_problems_file(tmp_path, "big.jsonl", 1200)).split_summary().startswith("train: 1,")


def test_a_bad_eval_file_is_reported_with_its_own_file_and_line(tmp_path: Path) -> None:
    train = _problems_file(tmp_path, "train.jsonl", 3)
    test = _write(tmp_path, ['{"question": "a", "answer": "1"}', '{"question": "b"}'], "test.jsonl")
    with pytest.raises(DatasetError, match=re.escape(f"{test}:2: field 'answer' is missing")):
        DatasetTask(train, eval_data=test)
    with pytest.raises(DatasetError, match="not found"):
        DatasetTask(train, eval_data=tmp_path / "missing.jsonl")


def test_an_empty_test_split_says_the_ways_out(tmp_path: Path) -> None:
    # a small file whose stable hash puts no row in the test share: the error names what the user can do about it
    path = _write(tmp_path, [json.dumps({"prompt": f"{n} + 1", "answer": str(n + 1)}) for n in range(3)])
    task = DatasetTask(path, test_fraction=1e-9)
    assert len(task.problems("train")) == 3
    with pytest.raises(DatasetError) as info:
        task.problems("test")
    message = str(info.value)
    assert f"{path}: the 'test' split is empty (test_fraction=1e-09 of 3 rows" in message
    assert all(way in message for way in ("eval_data: FILE", "--split all", "--eval-every 0")), message
