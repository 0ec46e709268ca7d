"""OpenEnv environments as tasks (`--task openenv:ENV`, r1lab/rewards/environments/openenv_env.py), against real
OpenEnv environments written here and served by openenv's own server. Needs `pip install 'r1lab[openenv]'`, which
cannot share an environment with r1lab[verifiers] (the mcp pin): .ci/run runs this file in a venv of its own."""

import importlib.util
import json
import os
import socket
import subprocess
import sys
import textwrap
import time
import urllib.request
from pathlib import Path

import pytest

from r1lab.config import GRPOConfig
from r1lab.rewards.rules import RewardWeights, score_completions
from r1lab.rewards.tasks import get_task
from r1lab.train.task_settings import check_settings

ROOT = Path(__file__).resolve().parent.parent
needs_openenv = pytest.mark.skipif(importlib.util.find_spec("openenv") is None,
                                   reason="openenv is not installed (pip install 'r1lab[openenv]')")

ENVIRONMENTS = '''
import time

from openenv.core.env_server import Action, Environment, Observation, State, create_app


class SayAction(Action):
    message: str


class SayObservation(Observation):
    prompt: str = ""


class SayNumber(Environment[SayAction, SayObservation, State]):
    """One step: say the number the prompt asks for (1.0), "boom" makes the step fail, "hang" makes it hang."""
    SUPPORTS_CONCURRENT_SESSIONS = True

    def __init__(self):
        super().__init__()
        self._state, self.target = State(), 0

    def reset(self, seed=None, episode_id=None, **kwargs):
        self.target, self._state = (seed or 0) % 10, State(episode_id=episode_id)
        return SayObservation(prompt=f"Say the number {self.target}.")

    def step(self, action, timeout_s=None, **kwargs):
        if "boom" in action.message:
            raise RuntimeError("boom")
        if "hang" in action.message:
            time.sleep(30)
        self._state.step_count += 1
        return SayObservation(done=True, reward=float(str(self.target) in action.message))

    @property
    def state(self):
        return self._state


class Count(Environment[SayAction, SayObservation, State]):
    """Three steps: count on from the seed's number; each right number earns 1.0, a wrong one ends the episode."""
    SUPPORTS_CONCURRENT_SESSIONS = True

    def __init__(self):
        super().__init__()
        self._state, self.next = State(), 0

    def reset(self, seed=None, episode_id=None, **kwargs):
        self.next, self._state = (seed or 0) % 100, State(episode_id=episode_id)
        return SayObservation(prompt=f"Count on from {self.next}: say {self.next}.")

    def step(self, action, timeout_s=None, **kwargs):
        self._state.step_count += 1
        right = action.message.strip() == str(self.next)
        self.next += 1
        done = not right or self._state.step_count == 3
        return SayObservation(prompt=f"Now say {self.next}.", done=done, reward=float(right))

    @property
    def state(self):
        return self._state


class Retry(Environment[SayAction, SayObservation, State]):
    """Three turns whatever is said, each answer with <answer> tags earning 1.0: every rollout gets the env's replies."""
    SUPPORTS_CONCURRENT_SESSIONS = True

    def __init__(self):
        super().__init__()
        self._state = State()

    def reset(self, seed=None, episode_id=None, **kwargs):
        self._state = State(episode_id=episode_id)
        return SayObservation(prompt=f"{(seed or 0) % 10}+1")

    def step(self, action, timeout_s=None, **kwargs):
        self._state.step_count += 1
        return SayObservation(prompt="Try once more.", done=self._state.step_count == 3,
                              reward=float("<answer>" in action.message))

    @property
    def state(self):
        return self._state


app = create_app(SayNumber, SayAction, SayObservation, max_concurrent_envs=8)
'''


@pytest.fixture(scope="module")
def env_module(tmp_path_factory, monkeypatch_module):
    """The environments' module, importable here and by the servers started from here."""
    path = tmp_path_factory.mktemp("envs")
    (path / "r1lab_test_envs.py").write_text(ENVIRONMENTS)
    monkeypatch_module.syspath_prepend(str(path))
    monkeypatch_module.setenv("PYTHONPATH", str(path))
    return path


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


@pytest.fixture(scope="module")
def served(env_module):
    """The single-step environment's app under uvicorn on a free port, as a user runs an OpenEnv server."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "uvicorn", "r1lab_test_envs:app", "--port", str(port),
                             "--log-level", "warning"], cwd=env_module, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 120
    try:
        while not _healthy(url):
            assert proc.poll() is None, proc.stdout.read().decode()[-2000:]
            assert time.monotonic() < deadline, "the OpenEnv server did not start"
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        proc.wait(30)


def _healthy(url):
    try:
        return urllib.request.urlopen(f"{url}/health", timeout=1).status == 200
    except OSError:
        return False


def conversation(problem, *turns):
    return [{"role": "user", "content": problem.prompt}, *({"role": "assistant", "content": t} for t in turns)]


def test_without_openenv_the_task_is_refused_with_what_to_install(monkeypatch, capsys):
    from r1lab.cli import main

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "openenv" else find_spec(name, *a))
    with pytest.raises(ValueError, match=r"pip install 'r1lab\[openenv\]'.*mcp"):
        get_task("openenv:http://127.0.0.1:9")
    with pytest.raises(ValueError, match=r"pip install 'r1lab\[openenv\]'"):
        check_settings(GRPOConfig(task="openenv:my_env.server.app:app"))
    with pytest.raises(SystemExit) as exit_:
        main(["grpo", "--model", "none", "--task", "openenv:my_env:MyEnv"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0] == "r1lab grpo: error: invalid settings:" and len(err) == 2  # the task's problem alone
    assert err[1].startswith("  task: --task openenv:... needs the openenv package: pip install 'r1lab[openenv]'")


@pytest.mark.parametrize("first", ["r1lab.rewards.environments", "r1lab.rewards.environments.openenv_env"])
def test_the_environments_import_first_or_through_the_tasks(first):
    """tasks import the OpenEnv task, which imports the environments package, which imports tasks.base: each order
    a program may take works (the child server imports the adapter first)."""
    subprocess.run([sys.executable, "-c", f"import {first}; from r1lab.rewards.tasks import get_task"], cwd=ROOT,
                   check=True)


class ScriptedEnvironment:
    """An environment whose rewards are written per completion: the scoring path of every environment standard."""
    name, max_turns = "scripted", 1

    def reply(self, problem, messages):
        raise AssertionError("single-turn: never asked")

    def rewards(self, problem, messages):
        assert messages[0] == {"role": "user", "content": problem.prompt} and messages[-1]["role"] == "assistant"
        outcome = {"right": {"reward": 2.0, "judge": 1.0}, "wrong": {"reward": 0.0, "judge": 0.0},
                   "nan": {"reward": float("nan")}, "inf": {"reward": 1.0, "judge": float("inf")}}
        if messages[-1]["content"] == "slow":
            time.sleep(2.0)  # past the scoring's timeout
        return outcome[messages[-1]["content"]]  # KeyError for anything else: a failing environment


def test_an_environments_reward_is_the_total_and_its_failures_are_counted():
    from r1lab.rewards.tasks import Problem

    with pytest.warns(RuntimeWarning, match="environment ScriptedEnvironment.rewards: "):
        result = score_completions(ScriptedEnvironment(), [Problem("p", "")] * 6,
                                   ["right", "wrong", "nan", "inf", "slow", "crash"], RewardWeights(), timeout_s=0.5)
    assert result.total == [2.0, 0, 0, 0, 0, 0] and result.components == {"judge": [1.0, 0, 0, 0, 0, 0]}
    assert result.correct == [True] + [False] * 5 and (result.errors, result.timeouts) == (3, 1)


@needs_openenv
def test_problems_come_from_reset_and_the_reward_from_step(served):
    task = get_task(f"openenv:{served}")
    assert task.action_field == "message" and task.max_turns == 1
    train, test = task.problems("train", 4, 0), task.problems("test", 4, 0)
    assert task.problems("train", 4, 0) == train  # deterministic for a seed
    assert not {p.meta["seed"] for p in train} & {p.meta["seed"] for p in test}  # disjoint splits
    for p in train:
        assert p.prompt == f"Say the number {p.meta['seed'] % 10}."
    right, wrong = str(train[0].meta["seed"] % 10), "I do not know"
    assert task.rewards(train[0], conversation(train[0], right)) == {"reward": 1.0, "openenv": 1.0}
    assert task.score(train[0], right) == 1.0 and task.score(train[0], wrong) == 0.0
    # each sample of a group plays its own episode from the same seed, whatever was played before
    result = score_completions(task, [train[0]] * 3, [wrong, right, right], RewardWeights(format=0.0))
    assert result.components == {"openenv": [0.0, 1.0, 1.0]} and result.total == [0.0, 1.0, 1.0]
    assert result.correct == [False, True, True] and result.errors == result.timeouts == 0


@needs_openenv
def test_a_failing_or_hanging_environment_is_counted_never_fatal(served):
    task = get_task(f"openenv:{served}", timeout_s=2.0)
    problem = task.problems("train", 1, 0)[0]
    right = str(problem.meta["seed"] % 10)
    with pytest.warns(RuntimeWarning, match="environment OpenEnvTask.rewards: "):
        result = score_completions(task, [problem] * 4, ["boom", "hang", right, "x"], RewardWeights(format=0.0))
    assert result.total == [0.0, 0.0, 1.0, 0.0]
    assert (result.errors, result.timeouts) == (1, 1)


@needs_openenv
def test_a_server_that_is_gone_costs_rewards_not_the_run(env_module):
    task = get_task("openenv:r1lab_test_envs:SayNumber", timeout_s=2.0)
    problems = task.problems("train", 2, 0)
    task.server.process.kill()
    task.server.process.wait()
    result = score_completions(task, problems, ["1", "2"], RewardWeights(format=0.0))
    assert result.total == [0.0, 0.0] and result.errors + result.timeouts == 2
    with pytest.warns(UserWarning, match="a reset failed"), pytest.raises(RuntimeError, match="3 resets failed"):
        task.problems("train", 2, 1)  # no prompt can be drawn from a server that is gone


@needs_openenv
def test_a_server_r1lab_starts_is_stopped_with_the_task(env_module):
    task = get_task("openenv:r1lab_test_envs:SayNumber")
    process = task.server.process
    assert task.problems("test", 1, 3)[0].prompt.startswith("Say the number")
    del task
    import gc

    gc.collect()
    assert process.wait(15) is not None
    with pytest.raises(ValueError, match="did not start: .*No module named 'no_such_env_module'"):
        get_task("openenv:no_such_env_module:Env")
    with pytest.raises(ValueError, match="neither http://host:port nor module:attribute"):
        get_task("openenv:no_such_env")


@needs_openenv
def test_the_server_ends_with_a_run_that_is_killed(env_module):
    run = subprocess.Popen([sys.executable, "-c", "from r1lab.rewards.tasks import get_task; import time; "
                            "t = get_task('openenv:r1lab_test_envs:SayNumber'); print(t.server.process.pid, flush=True); "
                            "time.sleep(600)"], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    server = int(run.stdout.readline())
    run.kill()  # SIGKILL: no atexit, no finalizer
    run.wait()
    deadline = time.monotonic() + 15
    while Path(f"/proc/{server}").exists() and "zombie" not in _status(server) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not Path(f"/proc/{server}").exists() or "zombie" in _status(server)


def _status(pid):
    try:
        return Path(f"/proc/{pid}/status").read_text().lower()
    except OSError:
        return "gone"


@needs_openenv
def test_a_multi_step_environment_answers_each_turn(env_module):
    task = get_task("openenv:r1lab_test_envs:Count", max_turns=3)
    problem = task.problems("train", 1, 0)[0]
    n = problem.meta["seed"] % 100
    assert problem.prompt == f"Count on from {n}: say {n}."
    # two rollouts of a group, interleaved turn by turn, each with its own episode
    a, b = conversation(problem, str(n)), conversation(problem, str(n))
    first_a, first_b = task.reply(problem, a), task.reply(problem, b)
    assert first_a.messages == [{"role": "user", "content": f"Now say {n + 1}."}] and not first_a.done
    assert first_a.rewards == first_b.rewards == {"openenv": 1.0}
    a += [*first_a.messages, {"role": "assistant", "content": str(n + 1)}]
    b += [*first_b.messages, {"role": "assistant", "content": "wrong"}]
    second_a, second_b = task.reply(problem, a), task.reply(problem, b)
    assert (second_a.done, second_b.done) == (False, True) and second_b.rewards == {"openenv": 0.0}
    a += [*second_a.messages, {"role": "assistant", "content": str(n + 2)}]
    assert task.reply(problem, a).done
    assert task.rewards(problem, a) == {"reward": 3.0, "openenv": 3.0}
    assert task.rewards(problem, b) == {"reward": 1.0, "openenv": 1.0}
    # a conversation whose replies were never asked is played through when it is scored
    c = conversation(problem, str(n), str(n + 1))
    c.insert(2, {"role": "user", "content": "(reply)"})
    assert task.rewards(problem, c) == {"reward": 2.0, "openenv": 2.0}
    assert not any(task._open.values())  # every episode was finished and its session returned
    # conversations scored from several threads at once (as a scorer's pool does): each its own episode
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(lambda i: task.rewards(problem, conversation(problem, *map(str, range(n, n + i % 4)))),
                            range(24)))
    assert [g["reward"] for g in got] == [float(i % 4) for i in range(24)]


@needs_openenv
@pytest.mark.slow
def test_grpo_trains_on_an_openenv_environment_through_the_cli(tiny_base, served, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "r1lab", "grpo", "--model", str(tiny_base), "--out", str(out), "--task",
         f"openenv:{served}", "--steps", "2", "--prompts-per-step", "2", "--samples-per-prompt", "2",
         "--max-new-tokens", "12", "--eval-every", "0", "--save-every", "0", "--device", "cpu"],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert 0.0 <= r["reward/openenv"] <= 1.0 and r["reward/mean"] == pytest.approx(r["reward/openenv"], abs=1e-6)
        assert r["scorer_errors"] == r["scorer_timeouts"] == 0 and "reward/format" not in r
    samples = "".join(p.read_text() for p in (out / "samples").iterdir())
    assert "Say the number" in samples  # the reset's observation was the prompt


@needs_openenv
@pytest.mark.slow
def test_grpo_plays_a_multi_step_openenv_environment_turn_by_turn(tiny_base, env_module, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "r1lab", "grpo", "--model", str(tiny_base), "--out", str(out), "--task",
         "openenv:r1lab_test_envs:Retry", "--task-options", "{max_turns: 3, sessions: 8}", "--steps", "2",
         "--prompts-per-step", "2", "--samples-per-prompt", "2", "--max-new-tokens", "100", "--eval-every", "0",
         "--save-every", "0", "--device", "cpu"],
        cwd=ROOT, capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONPATH": os.pathsep.join(
            [str(env_module), str(ROOT)])})
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:  # up to three steps' rewards summed per episode
        assert 0.0 <= r["reward/openenv"] <= 3.0 and r["scorer_errors"] == r["scorer_timeouts"] == 0
    assert any(r["env/calls_per_rollout"] > 0 and 0 < r["env/output_token_share"] < 1 for r in rows)
    assert any(r["reward/openenv"] > 1.0 for r in rows)  # a later turn's reward counted too
    samples = "".join(p.read_text() for p in (out / "samples").iterdir())
    assert "Try once more." in samples  # the env's reply between the policy's turns
