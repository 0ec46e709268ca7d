"""The code task: generated and file problems, scored by the share of assert tests passed in the sandbox."""

import json

import pytest

from r1lab.rewards import RewardWeights, score_completions
from r1lab.tasks import DatasetError, get_task
from r1lab.tasks.code import FAMILY_NAMES, canonical_code, strip_fences


def test_generated_problems_are_deterministic_disjoint_and_their_solutions_pass():
    task = get_task("code", tests_per_problem=4)
    train = task.problems("train", 30, seed=1)
    assert [p.prompt for p in train] == [p.prompt for p in task.problems("train", 30, seed=1)]
    test = task.problems("test", 30, seed=1)
    assert not {p.prompt for p in train} & {p.prompt for p in test}
    assert len({p.meta["family"] for p in train + test}) > 5
    for p in test[:5]:  # each reference solution passes its own tests in the sandbox
        assert task.score(p, p.answer) == 1.0


def test_reward_is_the_share_of_tests_passed_and_correct_means_all(tmp_path):
    rows = [{"prompt": "Write double(x).", "entry_point": "double",
             "tests": ["assert candidate(2) == 4", "assert double(0) == 0", "assert double(-3) == -6",
                       "assert double(5) == 10"]}] * 2
    path = tmp_path / "code.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    task = get_task("code", path=str(path), test_fraction=0.0)
    problem = task.problems("train", 1, seed=0)[0]
    completions = ["<think>times two</think><answer>```python\ndef double(x):\n    return 2 * x\n```</answer>",
                   "<think>square</think><answer>def double(x):\n    return x * x</answer>",  # passes 2 and 0
                   "<think>plus two</think><answer>def double(x):\n    return x + 2</answer>",  # passes 2 only
                   "<think>loop</think><answer>while True: pass</answer>",
                   "<think>no answer</think>"]
    result = score_completions(task, [problem] * 5, completions, RewardWeights(1.0, 0.0), timeout_s=10)
    assert result.components["accuracy"] == [1.0, 0.5, 0.25, 0.0, 0.0]
    assert result.correct == [True, False, False, False, False]  # pass@k counts full marks only
    assert result.errors == 0 and result.timeouts == 0  # a hanging answer is the sandbox's to stop, not an error


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
