"""Users' own reward functions ("module:function" or "file.py:function"), summed with the built-in rewards."""

import json
import math
import time

import pytest

from r1lab.rewards.rules import RewardWeights, score_completions
from r1lab.rewards.tasks import get_task
from r1lab.train import grpo

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


TRL_REWARDS_PY = '''
def accuracy(completions, solution, **kwargs):
    """open-r1's shape: conversational completions, the row's solution column."""
    return [float(c[0]["content"].endswith(s.split("#### ")[-1])) for c, s in zip(completions, solution)]

def plain(completions, prompts, level, **kwargs):
    return [len(c) / 100 + level[i] if prompts[i].startswith("What") else None for i, c in enumerate(completions)]

def not_a_list(completions, **kwargs):
    return 1.0
'''


def test_trl_reward_functions_get_what_trl_passes(tmp_path):
    """A reward function written for TRL's GRPOTrainer (completions, **kwargs) -> list: completions as messages
    for a conversational prompt, prompts, and the row's columns; None is 0 (TRL's nansum), a non-list an error."""
    (tmp_path / "trl_rewards.py").write_text(TRL_REWARDS_PY)
    rows = [{"prompt": [{"role": "user", "content": "What is 2+2?"}], "solution": "2+2 is 4\n#### 4"},
            {"question": "What is 1+1?", "answer": "#### 2", "level": 3}, {"question": "Sum 1+2", "answer": "3",
                                                                          "level": 1}]
    chat, plain = tmp_path / "chat.jsonl", tmp_path / "plain.jsonl"
    chat.write_text(json.dumps(rows[0]) + "\n")
    plain.write_text("".join(json.dumps(r) + "\n" for r in rows[1:]))
    spec = lambda name: ((f"{tmp_path / 'trl_rewards.py'}:{name}", 1.0),)  # noqa: E731
    task = get_task(str(chat), test_fraction=0.0)
    problem = task.problems("train", 0, 0)[0]
    result = score_completions(task, [problem] * 2, ["so it is 4", "so it is 5"],
                               RewardWeights(0.0, 0.0, functions=spec("accuracy")))
    assert result.components["accuracy"] == [1.0, 0.0] and result.errors == 0
    task = get_task(str(plain), test_fraction=0.0)
    problems = sorted(task.problems("train", 0, 0), key=lambda p: p.prompt, reverse=True)
    result = score_completions(task, problems, ["x" * 50] * 2, RewardWeights(0.0, 0.0, functions=spec("plain")))
    assert result.components["plain"] == [3.5, 0.0] and result.errors == 0
    result = score_completions(task, problems[:1], ["x"], RewardWeights(0.0, 0.0, functions=spec("not_a_list")))
    assert result.components["not_a_list"] == [0.0] and result.errors == 1


def test_trls_own_reward_functions_give_what_they_give_in_trl(tmp_path):
    """trl.rewards' functions by their spec, on a conversational data file: the rewards TRL's own call gives for the
    same completions (accuracy_reward's None for an unparseable solution is 0)."""
    rewards = pytest.importorskip("trl.rewards")
    data = tmp_path / "chat.jsonl"
    rows = [{"prompt": [{"role": "user", "content": "What is 2+2?"}], "solution": "4"},
            {"prompt": [{"role": "user", "content": "Name a colour"}], "solution": "no number here"}]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    task = get_task(str(data), answer_field="solution", test_fraction=0.0)
    problems = sorted(task.problems("train", 0, 0), key=lambda p: p.prompt, reverse=True)
    completions = ["<think>2 and 2</think>It is \\boxed{4}", "It is \\boxed{5}", "<think>hm</think>\\boxed{red}"]
    batch = [problems[0], problems[0], problems[1]]
    for name in ("accuracy_reward", "think_format_reward"):
        result = score_completions(task, batch, completions,
                                   RewardWeights(0.0, 0.0, functions=((f"trl.rewards:{name}", 1.0),)))
        expected = getattr(rewards, name)(completions=[[{"role": "assistant", "content": c}] for c in completions],
                                          solution=[p.meta["solution"] for p in batch])
        assert result.components[name] == [0.0 if v is None else v for v in expected] and result.errors == 0
    assert result.components["think_format_reward"] == [1.0, 0.0, 1.0]


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


# ---------------------------------------------------------------- functions that try to end or hang the run

HOSTILE_PY = '''
import os, sys, time
import numpy as np

def exits(completion, problem):
    sys.exit(3)

def interrupts(completion, problem):
    raise KeyboardInterrupt

def kills_its_process(completion, problem):
    if completion == "die":
        os._exit(1)
    return 1.0

def hangs_on(completion, problem):
    # A retry loop whose bare except swallows the timeout: only killing the worker stops it.
    if completion == "hang":
        while True:
            try:
                time.sleep(0.01)
            except:
                pass
    return float(len(completion))

VALUES = {"inf": float("inf"), "-inf": float("-inf"), "huge": 1e300, "big_int": 10 ** 400, "above": 1e6 + 1,
          "string": "1.5", "bool": True, "none": None, "np_float": np.float32(0.25), "np_int": np.int64(3),
          "bound": -1e6, "int": 2}

def returns(completion, problem):
    return VALUES[completion]

def pid(completion, problem):
    return os.getpid()
'''


@pytest.fixture
def hostile(tmp_path):
    path = tmp_path / "hostile.py"
    path.write_text(HOSTILE_PY)
    return lambda name: f"{path}:{name}"


@pytest.fixture
def pool():
    from r1lab.rewards.user_functions import RewardWorkers

    with RewardWorkers(workers=1) as workers:
        yield workers


def test_exit_and_keyboard_interrupt_are_contained_and_counted(hostile):
    task = get_task("arithmetic")
    problem = task.problems("test", 1, seed=0)[0]
    functions = ((hostile("exits"), 1.0), (hostile("interrupts"), 1.0))
    with pytest.warns(RuntimeWarning, match="raised SystemExit: 3"):
        result = score_completions(task, [problem] * 3, ["a", "b", "c"], RewardWeights(0.0, 0.0, functions=functions))
    assert result.components["exits"] == result.components["interrupts"] == [0.0] * 3
    assert result.errors == 6 and result.timeouts == 0  # and this test process is still running


@pytest.mark.slow
def test_a_call_that_swallows_the_timeout_is_killed_and_the_rest_is_still_scored(hostile, pool):
    start = time.monotonic()
    out = pool.score({hostile("hangs_on"): [("a", None), ("hang", None), ("bc", None), ("def", None)]}, 0.3)
    assert time.monotonic() - start < 6  # the 0.3 s timeout + 1 s of grace, not forever
    assert out[hostile("hangs_on")] == [("ok", 1.0), ("timeout", None), ("ok", 2.0), ("ok", 3.0)]


def test_a_function_that_kills_its_worker_costs_only_that_call(hostile, pool):
    # The fast calls before "die" finish within one batch the worker never sends: they must not be blamed or lost.
    items = [("a", None), ("b", None), ("c", None), ("die", None), ("d", None), ("die", None), ("e", None)]
    outcomes = pool.score({hostile("kills_its_process"): items}, 5.0)[hostile("kills_its_process")]
    for (completion, _), (kind, value) in zip(items, outcomes):
        if completion == "die":
            assert kind == "error" and "ended its worker process" in value
        else:
            assert (kind, value) == ("ok", 1.0), completion


@pytest.mark.parametrize("name, expected", [
    ("inf", None), ("-inf", None), ("huge", None), ("big_int", None), ("above", None), ("string", None),
    ("bool", None), ("none", None), ("np_float", 0.25), ("np_int", 3.0), ("bound", -1e6), ("int", 2.0),
])
def test_only_bounded_real_numbers_are_rewards(hostile, pool, name, expected):
    kind, value = pool.score({hostile("returns"): [(name, None)]}, 5.0)[hostile("returns")][0]
    if expected is None:
        assert kind == "error", value
    else:
        assert (kind, value) == ("ok", expected) and type(value) is float


def test_checked_reward_says_what_is_wrong():
    from r1lab.rewards.user_functions import RewardValueError, checked_reward

    with pytest.raises(RewardValueError, match="returned str, not a number"):
        checked_reward("1.5")
    with pytest.raises(RewardValueError, match="not a finite number"):
        checked_reward(math.inf)
    with pytest.raises(RewardValueError, match="beyond the bound"):
        checked_reward(-2e6)


def test_an_inf_reward_is_an_error_not_a_nonfinite_step(hostile):
    task = get_task("arithmetic")
    problem = task.problems("test", 1, seed=0)[0]
    weights = RewardWeights(1.0, 0.0, functions=((hostile("returns"), 1.0),))
    result = score_completions(task, [problem] * 2, ["inf", "int"], weights)
    assert result.total == [0.0, 2.0] and all(math.isfinite(t) for t in result.total)
    assert result.errors == 1


def test_unpicklable_problem_and_vanished_module_are_errors(rewards_file, pool):
    from r1lab.rewards.tasks.base import Problem

    out = pool.score({f"{rewards_file}:brevity": [("a", Problem("q", "1", {"f": lambda: 0}))]}, 5.0)
    assert out[f"{rewards_file}:brevity"][0][0] == "error"
    moved = rewards_file.with_name("moved_rewards.py")
    moved.write_text(REWARDS_PY)
    RewardWeights(functions=((f"{moved}:brevity", 1.0),))  # loads fine in the trainer...
    moved.unlink()
    kind, reason = pool.score({f"{moved}:brevity": [("a", None)]}, 5.0)[f"{moved}:brevity"][0]
    assert kind == "error" and "cannot be loaded in a worker" in reason  # ...then is gone for the worker


def test_workers_are_reused_and_none_is_left_after_close(hostile):
    from r1lab.rewards.user_functions import RewardWorkers

    pool = RewardWorkers(workers=2)
    items = [("a", None)] * 10
    first = {value for _, value in pool.score({hostile("pid"): items}, 5.0)[hostile("pid")]}
    second = {value for _, value in pool.score({hostile("pid"): items}, 5.0)[hostile("pid")]}
    assert len(first) == 2 and first == second  # two workers, both kept between calls
    processes = [w.process for w in pool._idle]
    pool.close()
    assert all(p.poll() is not None for p in processes)


def test_outcomes_are_batched_but_a_long_call_is_preceded_by_a_flush():
    from r1lab.rewards.user_functions import FLUSH_S, _Reporter

    class Recorder:
        def __init__(self):
            self.messages = []

        def send(self, message):
            self.messages.append((time.monotonic(), message))

    conn = Recorder()
    reporter = _Reporter(conn)
    for i in range(1000):  # a cheap function: few messages for many calls
        reporter.begin()
        reporter.add(("ok", 1.0), last=i == 999)
    assert len(conn.messages) <= 5 and sum(len(m[1]) for _, m in conn.messages) == 1000
    conn.messages.clear()
    reporter.begin()
    reporter.add(("ok", 2.0), last=False)
    reporter.begin()  # a call that runs long: what came before it is sent while it runs
    time.sleep(4 * FLUSH_S)
    assert [m for _, m in conn.messages] == [("done", [("ok", 2.0)])]
