"""Users' own reward functions ("module:function" or "file.py:function"), summed with the built-in rewards."""

import json
import math
import time

import pytest

from r1lab import grpo
from r1lab.rewards import RewardWeights, score_completions
from r1lab.tasks import get_task

REWARDS_PY = '''
import math, time

def brevity(completion, problem):
    return 1.0 if len(completion) < 40 else 0.0

def mentions_reference(completion, problem):
    return float(problem.answer in completion)

def broken(completion, problem):
    raise RuntimeError("bug in the user's reward")

def not_a_number(completion, problem):
    return math.nan

def slow(completion, problem):
    time.sleep(5)
    return 1.0

def no_arguments():
    return 1.0
'''


@pytest.fixture
def rewards_file(tmp_path):
    path = tmp_path / "my_rewards.py"
    path.write_text(REWARDS_PY)
    return path


def test_functions_add_to_the_total_with_their_weights(rewards_file):
    task = get_task("arithmetic")
    problem = task.problems("test", 1, seed=0)[0]
    completions = [f"<think>sum</think><answer>{problem.answer}</answer>", "<think>" + "x" * 60 + "</think>"]
    weights = RewardWeights(1.0, 1.0, functions=((f"{rewards_file}:brevity", 0.5),
                                                 (f"{rewards_file}:mentions_reference", 2.0)))
    result = score_completions(task, [problem] * 2, completions, weights)
    assert result.components["brevity"] == [1.0, 0.0]
    assert result.components["mentions_reference"] == [1.0, 0.0]
    assert result.total == [1.0 + 1.0 + 0.5 + 2.0, 0.0 + 0.0 + 0.0 + 0.0]


def test_a_failing_function_gives_zero_and_is_counted(rewards_file):
    task = get_task("arithmetic")
    problem = task.problems("test", 1, seed=0)[0]
    functions = tuple((f"{rewards_file}:{name}", 1.0) for name in ("broken", "not_a_number", "slow"))
    start = time.monotonic()
    result = score_completions(task, [problem], ["<answer>1</answer>"], RewardWeights(1.0, 0.0, functions=functions),
                               timeout_s=0.3)
    assert time.monotonic() - start < 3
    assert result.components["broken"] == result.components["not_a_number"] == result.components["slow"] == [0.0]
    assert result.errors == 2 and result.timeouts == 1


@pytest.mark.parametrize("spec, message", [
    ("no_colon_here", "write it as 'module:function'"),
    ("{dir}/missing.py:f", "no file"),
    ("{dir}/my_rewards.py:absent", "has no function 'absent'"),
    ("{dir}/my_rewards.py:no_arguments", "must accept (completion, problem)"),
    ("r1lab_no_such_module:f", "cannot import 'r1lab_no_such_module'"),
])
def test_bad_specs_fail_at_start_and_say_why(rewards_file, tiny_base, tmp_path, spec, message):
    spec = spec.format(dir=rewards_file.parent)
    cfg = grpo.GRPOConfig(model=str(tiny_base), out=str(tmp_path / "run"), reward_functions={spec: 1.0})
    with pytest.raises(ValueError, match="invalid GRPO config: .*" + message.replace("(", r"\(").replace(")", r"\)")):
        grpo.train(cfg, log=lambda *_: None)
    assert not (tmp_path / "run").exists()  # nothing was started


def test_importable_module_and_weight_check(tmp_path, monkeypatch):
    (tmp_path / "team_rewards.py").write_text("def length(completion, problem):\n    return len(completion) / 100\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    task = get_task("arithmetic")
    problem = task.problems("test", 1, seed=0)[0]
    weights = RewardWeights(0.0, 0.0, functions=(("team_rewards:length", 2.0),))
    result = score_completions(task, [problem], ["x" * 50], weights)
    assert result.total == [pytest.approx(1.0)]
    cfg = grpo.GRPOConfig(reward_functions={"team_rewards:length": "heavy"})
    with pytest.raises(ValueError, match="its weight must be a number"):
        cfg.check()


def test_grpo_logs_each_functions_mean(rewards_file, tiny_base, tmp_path):
    from test_grpo import small_config

    cfg = small_config(tiny_base, tmp_path, steps=1, reward_functions={f"{rewards_file}:brevity": 0.5})
    grpo.train(cfg, log=lambda *_: None)
    row = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    assert 0.0 <= row["reward/brevity"] <= 1.0 and math.isfinite(row["reward/mean"])
