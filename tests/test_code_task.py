"""The code task: generated and file problems, scored by the share of assert tests passed in the sandbox."""

import json

import pytest

from r1lab.rewards.rules import RewardWeights, score_completions
from r1lab.rewards.tasks import DatasetError, get_task
from r1lab.rewards.tasks.code import FAMILY_NAMES, canonical_code, strip_fences


def test_generated_problems_are_deterministic_disjoint_and_their_solutions_pass():
    task = get_task("code", tests_per_problem=4)
    train = task.problems("train", 30, seed=1)
    assert [p.prompt for p in train] == [p.prompt for p in task.problems("train", 30, seed=1)]
    test = task.problems("test", 30, seed=1)
    assert not {p.prompt for p in train} & {p.prompt for p in test}
    assert len({p.meta["family"] for p in train + test}) > 5
    for p in test[:5]:  # each reference solution passes its own tests in the sandbox
        assert task.score(p, p.answer) == 1.0


def double_problem(tmp_path):
    rows = [{"prompt": "Write double(x).", "entry_point": "double",
             "tests": ["assert candidate(2) == 4", "assert double(0) == 0", "assert double(-3) == -6",
                       "assert double(5) == 10"]}] * 2
    path = tmp_path / "code.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    task = get_task("code", path=str(path), test_fraction=0.0)
    return task, task.problems("train", 1, seed=0)[0]


def test_reward_is_the_share_of_tests_passed_and_correct_means_all(tmp_path):
    task, problem = double_problem(tmp_path)
    completions = ["<think>times two</think><answer>```python\ndef double(x):\n    return 2 * x\n```</answer>",
                   "<think>square</think><answer>def double(x):\n    return x * x</answer>",  # passes 2 and 0
                   "<think>plus two</think><answer>def double(x):\n    return x + 2</answer>",  # passes 2 only
                   "<think>no answer</think>"]
    result = score_completions(task, [problem] * 4, completions, RewardWeights(1.0, 0.0), timeout_s=10)
    assert result.components["accuracy"] == [1.0, 0.5, 0.25, 0.0]
    assert result.correct == [True, False, False, False]  # pass@k counts full marks only
    assert result.errors == 0 and result.timeouts == 0


@pytest.mark.slow  # waits for the sandbox's CPU limit
def test_a_hanging_answer_scores_zero_and_is_the_sandboxs_to_stop(tmp_path):
    task, problem = double_problem(tmp_path)
    result = score_completions(task, [problem], ["<think>loop</think><answer>while True: pass</answer>"],
                               RewardWeights(1.0, 0.0), timeout_s=10)
    assert result.components["accuracy"] == [0.0] and result.correct == [False]
    assert result.errors == 0 and result.timeouts == 0  # the sandbox stopped it: not an error of the reward


def test_fences_and_canonical_form():
    assert strip_fences("```python\ndef f():\n    return 1\n```") == "def f():\n    return 1"
    assert strip_fences("def f(): return 1") == "def f(): return 1"
    assert canonical_code("def f( x ):  # add\n    return x+1") == canonical_code("def f(x):\n    return x + 1")


def test_a_bad_file_row_is_reported_with_line_and_field(tmp_path):
    path = tmp_path / "code.jsonl"
    path.write_text(json.dumps({"prompt": "ok", "tests": ["assert True"]}) + "\n"
                    + json.dumps({"prompt": "bad", "tests": ["assert ("]}) + "\n")
    with pytest.raises(DatasetError, match=r"code.jsonl:2: field 'tests' item 0 does not compile"):
        get_task("code", path=str(path))


def test_unknown_family_fails_clearly():
    with pytest.raises(ValueError, match="unknown code families"):
        get_task("code", families=["nope"])
    assert "clamp" in FAMILY_NAMES


def test_every_family_passes_its_reference_and_fails_a_wrong_answer():
    task = get_task("code", tests_per_problem=4)
    problems = {p.meta["family"]: p for p in task.problems("train", 200, seed=3)}
    assert set(problems) == set(FAMILY_NAMES)
    for name, problem in problems.items():
        assert task.score(problem, problem.answer) == 1.0, name
        entry_point = problem.meta["entry_point"]
        assert task.score(problem, f"def {entry_point}(*args):\n    return None\n") < 1.0, name


def _file_task(tmp_path, rows):
    path = tmp_path / "code.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return get_task("code", path=str(path), test_fraction=0.0)


def test_file_tests_in_the_usual_shapes_are_judged(tmp_path):
    tests = ["assert candidate(2) is True", "assert is_even(3) is False", "assert not candidate(5)",
             "assert is_even(4)", "assert strict_equal(candidate(0), True)", "assert candidate(n=2) == True",
             "assert abs(half(3) - 1.5) < 1e-9", "assert half(0.3) == 0.15", "  assert candidate(-2) != False  "]
    task = _file_task(tmp_path, [{"prompt": "Write is_even(n).", "entry_point": "is_even", "tests": tests}] * 2)
    problem = task.problems("train", 1, seed=0)[0]
    right = "def is_even(n):\n    return n % 2 == 0\ndef half(x):\n    return x / 2\n"
    assert task.score(problem, right) == 1.0
    truthy = "def is_even(n):\n    return 1 - n % 2\ndef half(x):\n    return x // 2\n"  # ints, not bools
    assert task.score(problem, truthy) == 3 / 9  # `not`, truthiness and `!= False` hold; `is`, == and floats do not


@pytest.mark.parametrize(("test", "message"), [
    ("for x in range(3): assert candidate(x) == x", "item 1 must be a single assert statement"),
    ("assert candidate(sorted([3, 1])) == [1, 3]", "item 1 calls f\\(\\) with an argument that is not a literal"),
    ("assert candidate(1).bit_length() == 1", "item 1 uses the attribute .bit_length"),
    ("assert expected == candidate(1)", "item 1 uses the name 'expected'"),
])
def test_a_test_the_judge_cannot_split_is_refused_at_load(tmp_path, test, message):
    rows = [{"prompt": "ok", "entry_point": "f", "tests": ["assert True"]},
            {"prompt": "bad", "entry_point": "f", "tests": ["assert candidate(1) == 1", test]}]
    with pytest.raises(DatasetError, match=rf"code.jsonl:2: field 'tests' {message}"):
        _file_task(tmp_path, rows)


def test_code_reward_hacks_score_zero(tmp_path):
    task = _file_task(tmp_path, [{"prompt": "Write add(a, b).", "entry_point": "add",
                                  "tests": ["assert candidate(1, 2) == 3", "assert add(2, 2) == 4"]}] * 2)
    problem = task.problems("train", 1, seed=0)[0]
    # A forged report line can only claim return values, judged like real ones: without the answers (never in
    # the sandbox), it claims wrong ones.
    hacks = ["class A:\n    def __eq__(self, other):\n        return True\ndef add(a, b):\n    return A()\n",
             "import os\nfor fd in range(3, 16):\n    try:\n        os.write(fd, b'0 ok [True]\\n1 ok [True]\\n')\n"
             "    except OSError:\n        pass\nos._exit(0)\n",
             "import builtins\nbuiltins.abs = lambda x: 0\ndef add(a, b):\n    return 0\n",
             "def add(a, b):\n    return 'x' * 10 ** 8\n",
             "def add(a, b):\n    return (a + b for _ in '1')\n"]
    completions = [f"<think>hack</think><answer>{h}</answer>" for h in hacks]
    result = score_completions(task, [problem] * len(hacks), completions, RewardWeights(1.0, 0.0), timeout_s=10)
    assert result.components["accuracy"] == [0.0] * len(hacks)
