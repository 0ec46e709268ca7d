"""Language consistency: the share of the chain of thought's words in the target language (R1 stage 2)."""

import pytest

from r1lab.rewards.language import language_consistency, script_words
from r1lab.rewards.rules import RewardWeights, score_completions
from r1lab.rewards.tasks import get_task


@pytest.mark.parametrize("text, target, expected", [
    ("<think>add 3 and 4</think><answer>7</answer>", "en", 1.0),
    ("<think>我们 add 3 and 4</think><answer>7</answer>", "en", 0.5),  # 我, 们 are two words; add, and are two
    ("<think>我们 add 3 and 4</think><answer>7</answer>", "zh", 0.5),
    ("<think>сложим 3 и 4, then 7</think>", "ru", 2 / 3),
    ("<think>12 + 30 = 42</think><answer>42</answer>", "en", 1.0),  # no words: nothing in another language
    ("no think tags here", "en", 0.0),
    ("<think>cut short, still english", "en", 1.0),  # a truncated chain of thought still counts
    ("<think>ok</think> 中文 after the think part", "en", 1.0),  # only the chain of thought is judged
])
def test_language_consistency(text, target, expected):
    assert language_consistency(text, target) == pytest.approx(expected)


def test_script_changes_inside_a_run_split_words():
    assert script_words("abcабв") == ["latin", "cyrillic"]


def test_unknown_language_fails_at_once():
    with pytest.raises(ValueError, match="unknown language 'xx'"):
        RewardWeights(language=0.1, target_language="xx")


def test_language_reward_adds_to_accuracy_and_format():
    task = get_task("arithmetic")
    problem = task.problems("test", 1, seed=0)[0]
    right = f"<think>add them 中</think><answer>{problem.answer}</answer>"
    result = score_completions(task, [problem], [right], RewardWeights(1.0, 1.0, 0.5, "en"))
    assert result.components["language"] == [pytest.approx(2 / 3)]
    assert result.total == [pytest.approx(1.0 + 1.0 + 0.5 * 2 / 3)]
    plain = score_completions(task, [problem], [right], RewardWeights(1.0, 1.0))
    assert "language" not in plain.components and plain.total == [2.0]
