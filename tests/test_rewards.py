"""Reward pitfalls that make a run silently wrong (R1 recipe section 3)."""

from __future__ import annotations

import signal
import time

import pytest

from r1lab.rewards.rules import RewardWeights, extract_answer, format_reward, score_completions
from r1lab.rewards.tasks.arithmetic import ArithmeticTask
from r1lab.rewards.tasks.base import Problem

GOOD = "<think>3 plus 4\nis 7</think>\n<answer>7</answer>"


class ExactTask:
    """Scores 1.0 when the answer equals the reference exactly."""

    name = "exact"

    def problems(self, split: str, n: int, seed: int) -> list[Problem]:
        return []

    def score(self, problem: Problem, answer: str) -> float:
        return 1.0 if answer == problem.answer else 0.0

    def canonical(self, answer: str) -> str:
        return answer


class RaisingTask(ExactTask):
    def score(self, problem: Problem, answer: str) -> float:
        raise RuntimeError("scorer bug")


class SlowTask(ExactTask):
    def score(self, problem: Problem, answer: str) -> float:
        while True:  # a pathological scorer: only the timeout can stop it
            time.sleep(0.01)


def test_extract_multiline_answer_kept_whole() -> None:
    assert extract_answer("<think>x</think><answer>\nline 1\nline 2\n</answer>") == "line 1\nline 2"


def test_extract_missing_or_unclosed_is_none() -> None:
    assert extract_answer("the answer is 7") is None
    assert extract_answer("<answer>7") is None
    assert extract_answer("7</answer>") is None
    assert extract_answer("</answer>7<answer>") is None


def test_extract_never_falls_back_to_whole_text() -> None:
    assert extract_answer("<think>7</think> 7") is None


def test_extract_takes_last_pair() -> None:
    assert extract_answer("<answer>1</answer> <answer> 2 </answer>") == "2"
    assert extract_answer("<answer>1</answer> <answer>2") == "1"


def test_format_good_and_multiline() -> None:
    assert format_reward(GOOD) == 1.0
    assert format_reward("  \n" + GOOD + "\n\n") == 1.0  # leading and trailing whitespace are fine
    assert format_reward("<think>a\nb\nc</think><answer>x\ny</answer>") == 1.0  # needs DOTALL


@pytest.mark.parametrize(
    "text",
    [
        "<answer>7</answer><think>x</think>",  # wrong order
        "<think>x</think><answer>1</answer><answer>2</answer>",  # two answers
        "<think>x</think><think>y</think><answer>7</answer>",  # two thinks
        "<think>x<answer>7</answer></think><answer>7</answer>",  # answer tag inside think
        "<think>x</think><answer>  </answer>",  # empty answer
        "<think>x</think><answer>7</answer> trailing text",
        "preamble <think>x</think><answer>7</answer>",
        "<think>x</think><answer>7",  # unclosed
        "<think>x<answer>7</answer>",  # think never closed
        "7",
        "",
    ],
)
def test_format_rejects(text: str) -> None:
    assert format_reward(text) == 0.0


def test_empty_answer_gets_no_accuracy() -> None:
    result = score_completions(ExactTask(), [Problem("q", "")], ["<think>x</think><answer></answer>"])
    assert result.components["accuracy"] == [0.0]
    assert result.answers == [""]


def test_score_completions_combines_weights() -> None:
    problems = [Problem("3+4", "7")] * 3
    completions = [GOOD, "<think>x</think><answer>8</answer>", "7"]
    result = score_completions(ArithmeticTask(), problems, completions, weights=RewardWeights(2.0, 0.5))
    assert result.components == {"accuracy": [1.0, 0.0, 0.0], "format": [1.0, 1.0, 0.0]}
    assert result.total == [2.5, 0.5, 0.0]
    assert result.correct == [True, False, False]
    assert result.answers == ["7", "8", None]
    assert (result.errors, result.timeouts) == (0, 0)


def test_response_prefix_is_part_of_the_response() -> None:
    completion = "3 plus 4 is 7</think> <answer>7</answer>"
    assert score_completions(ArithmeticTask(), [Problem("3+4", "7")], [completion]).components["format"] == [0.0]
    result = score_completions(ArithmeticTask(), [Problem("3+4", "7")], [completion], response_prefix="<think>")
    assert result.components == {"accuracy": [1.0], "format": [1.0]}


def test_raising_scorer_is_zero_and_counted() -> None:
    result = score_completions(RaisingTask(), [Problem("q", "7")] * 2, [GOOD, "no tags"])
    assert result.components["accuracy"] == [0.0, 0.0]
    assert result.components["format"] == [1.0, 0.0]
    assert result.errors == 1  # the completion without an answer never reaches the scorer


def test_hanging_scorer_is_interrupted_and_counted() -> None:
    started = time.monotonic()
    result = score_completions(SlowTask(), [Problem("q", "7")], [GOOD], timeout_s=0.2)
    assert time.monotonic() - started < 1.5
    assert result.components["accuracy"] == [0.0]
    assert result.total == [1.0]
    assert (result.errors, result.timeouts) == (0, 1)


def test_timeout_restores_previous_handler() -> None:
    before = signal.getsignal(signal.SIGALRM)
    score_completions(SlowTask(), [Problem("q", "7")], [GOOD], timeout_s=0.1)
    assert signal.getsignal(signal.SIGALRM) is before
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)


def test_never_raises_on_bad_inputs() -> None:
    result = score_completions(ExactTask(), [Problem("q", "7")], [GOOD, None])  # type: ignore[list-item]
    assert result.total == [2.0, 0.0]  # a non-string completion scores 0
    assert result.errors == 0
    result = score_completions(ExactTask(), [], [GOOD])  # a completion without a problem is an error, not a crash
    assert result.errors == 1 and result.total == [1.0]
