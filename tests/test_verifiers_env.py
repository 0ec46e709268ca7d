"""`--task verifiers:ENV` (r1lab/rewards/environments/verifiers_env.py): real verifiers environment packages, written
here and found as verifiers finds installed ones (an importable module named by the id), trained by `r1lab grpo`.
Skipped where verifiers is not installed (pip install 'r1lab[verifiers]'), but for the refusal that says so."""

import importlib.util
import json
import os
import re
import subprocess
import sys
import threading
from pathlib import Path

import pytest

import r1lab.train.grpo as grpo
from r1lab.config import GRPOConfig
from r1lab.engine.engine import Sample
from r1lab.engine.tools import EnvTurns, context_delta, generate_with_tools
from r1lab.model.tokenizer import build_tiny_tokenizer
from r1lab.rewards.rules import score_completions
from r1lab.rewards.tasks import get_task

ROOT = Path(__file__).resolve().parent.parent
TOK = build_tiny_tokenizer()
needs_verifiers = pytest.mark.skipif(importlib.util.find_spec("verifiers") is None,
                                     reason="verifiers is not installed: pip install 'r1lab[verifiers]'")

SUMS_ENV = '''
"""Sums of 3 or 4 digits, single turn: a rubric of two weighted rewards."""
import random
import re

import verifiers.v1 as vf


class SumsConfig(vf.TasksetConfig):
    num_examples: int = 40
    seed: int = 0


class SumsData(vf.TaskData):
    answer: str


def answer_of(text):
    found = re.search(r"<answer>(.*?)</answer>", text, re.S)
    return found.group(1).strip() if found else None


class SumsTask(vf.Task[SumsData, vf.State, vf.TaskConfig]):
    @vf.reward(weight=1.0)
    async def correct(self, trace) -> float:
        return float(answer_of(trace.last_reply) == self.data.answer)

    @vf.reward(weight=0.5)
    async def tagged(self, trace) -> float:
        return float(answer_of(trace.last_reply) is not None)


class SumsTaskset(vf.Taskset[SumsTask, SumsConfig]):
    def load(self):
        rng = random.Random(self.config.seed)
        for _ in range(self.config.num_examples):
            terms = [rng.randint(1, 9) for _ in range(rng.randint(3, 4))]
            yield SumsTask(SumsData(prompt="+".join(map(str, terms)), answer=str(sum(terms))), self.config.task)


__all__ = ["SumsTaskset"]
'''

GUESS_ENV = '''
"""The same sums, multi-turn: a wrong answer gets feedback and another try, at most 3 turns."""
import verifiers.v1 as vf
from sums_env import SumsTaskset, answer_of


class GuessConfig(vf.EnvConfig):
    player: vf.AgentConfig = vf.AgentConfig(max_turns=3)


class GuessEnv(vf.Env[GuessConfig]):
    async def run(self, task, agents):
        async with agents.player.interaction(task) as chat:
            segment = await chat.turn()
            while not segment.terminated and answer_of(segment.last_reply) != task.data.answer:
                guess = answer_of(segment.last_reply) or ""
                hint = "higher" if guess.isdigit() and int(guess) < int(task.data.answer) else "lower"
                segment = await chat.turn(f"wrong, {hint if guess.isdigit() else 'no answer'}: try again")
        chat.trace.record_reward("first_try", float(chat.trace.num_turns == 1), 0.5)


__all__ = ["SumsTaskset", "GuessEnv"]
'''


@pytest.fixture(scope="module")
def packages(tmp_path_factory):
    """A directory holding the two environment packages, on sys.path as an installed package's would be."""
    root = tmp_path_factory.mktemp("environments")
    for name, source in (("sums_env", SUMS_ENV), ("guess_env", GUESS_ENV)):
        (root / name).mkdir()
        (root / name / "__init__.py").write_text(source)
    sys.path.insert(0, str(root))
    yield root
    sys.path.remove(str(root))


def test_without_verifiers_the_task_is_refused_in_one_line(monkeypatch):
    from r1lab.rewards.environments import verifiers_env

    monkeypatch.setattr(verifiers_env, "vf", None)
    with pytest.raises(ValueError) as err:
        get_task("verifiers:sums_env")
    assert str(err.value) == "--task verifiers:sums_env needs the verifiers package: pip install 'r1lab[verifiers]'"


@needs_verifiers
def test_problems_come_from_the_taskset_in_disjoint_splits(packages):
    env = get_task("verifiers:sums_env", num_examples=30)
    train, test = env.problems("train", None, 0), env.problems("test", None, 0)
    assert len(train) + len(test) == 30 and test and not {p.meta["key"] for p in train} & {p.meta["key"] for p in test}
    p = train[0]
    assert p.messages == [{"role": "user", "content": p.prompt}] and re.fullmatch(r"\d(\+\d){2,3}", p.prompt)
    assert p.answer == str(eval(p.prompt)) and p.meta["info"]["answer"] == p.answer
    assert env.problems("train", 5, 3) == env.problems("train", 5, 3) and env.max_turns == 1
    with pytest.raises(ValueError, match=r"^verifiers:sums_env: ValidationError: .*nope"):
        get_task("verifiers:sums_env", nope=1)  # options are the taskset config's fields
    with pytest.raises(ValueError, match=r"^verifiers:no_such_env: ModuleNotFoundError"):
        get_task("verifiers:no_such_env")


@needs_verifiers
def test_the_reward_is_the_rubrics_weighted_total_with_each_function_a_component(packages):
    env = get_task("verifiers:sums_env")
    p = env.problems("train", 1, 0)[0]
    result = score_completions(env, [p] * 3, [f"<answer>{p.answer}</answer>", "<answer>-1</answer>", p.answer])
    assert result.total == [1.5, 0.5, 0.0] and result.correct == [True, False, False]
    assert result.components == {"correct": [1.0, 0.0, 0.0], "tagged": [1.0, 1.0, 0.0]}
    assert (result.errors, result.timeouts) == (0, 0)


@needs_verifiers
def test_a_multi_turn_env_replies_until_it_is_done(packages):
    env = get_task("verifiers:guess_env")
    p = env.problems("train", 1, 0)[0]
    wrong = [*p.messages, {"role": "assistant", "content": "<answer>0</answer>"}]
    reply = env.reply(p, wrong)
    assert (reply.messages, reply.done) == ([{"role": "user", "content": "wrong, higher: try again"}], False)
    right = [*wrong, *reply.messages, {"role": "assistant", "content": f"<answer>{p.answer}</answer>"}]
    assert env.reply(p, right).done and env.max_turns == 3
    assert env.rewards(p, right) == {"correct": 1.0, "tagged": 1.0, "first_try": 0.0, "reward": 1.5}
    stubborn = [*p.messages] + [{"role": "assistant", "content": "<answer>0</answer>"},
                                {"role": "user", "content": "wrong, higher: try again"}] * 3
    assert env.reply(p, stubborn[:-1]).done  # its 3 turns are over


def sums_script(text):
    """A policy that answers 0 first, then the right sum once told it was wrong."""
    expression = re.findall(r"\d(?:\+\d)+", text)[-1]
    return f"<answer>{eval(expression)}</answer>" if "try again" in text else "<answer>0</answer>"


class ScriptedEngine:
    """Writes script(text so far), then end-of-text; log-prob -0.5 on every sampled token."""

    tokenizer = TOK

    def generate(self, prompt_ids, *, num_samples=1, max_new_tokens=128, **_):
        limits = max_new_tokens if isinstance(max_new_tokens, list) else [max_new_tokens] * len(prompt_ids)
        out = []
        for i, prompt in enumerate(prompt_ids):
            ids = (TOK.encode(sums_script(TOK.decode(prompt)), add_special_tokens=False) + sorted(TOK.eos_ids))
            ids = ids[: limits[i]]
            out += [Sample(i, ids, TOK.decode(ids), [-0.5] * len(ids), "stop") for _ in range(num_samples)]
        return out


@needs_verifiers
def test_env_tokens_are_the_templates_delta_and_never_trained(packages):
    env = get_task("verifiers:guess_env")
    problems = env.problems("train", 2, 0)
    prompts = [TOK.encode(p.prompt) for p in problems]
    samples = generate_with_tools(ScriptedEngine(), prompts, EnvTurns(env, problems, TOK, "r1zero"), num_samples=2,
                                  max_new_tokens=200)
    hint = [{"role": "user", "content": "wrong, higher: try again"}]
    delta = TOK.encode(context_delta(TOK, hint, "r1zero"), add_special_tokens=False)
    first = TOK.encode("<answer>0</answer>", add_special_tokens=False) + sorted(TOK.eos_ids)
    for s, p in zip(samples, [q for q in problems for _ in range(2)]):
        second = TOK.encode(f"<answer>{p.answer}</answer>", add_special_tokens=False) + sorted(TOK.eos_ids)
        assert s.token_ids == first + delta + second  # the sampled tokens as sampled, the env's between them
        assert s.model_mask == [True] * len(first) + [False] * len(delta) + [True] * len(second)
        assert s.logprobs == [-0.5] * len(first) + [0.0] * len(delta) + [-0.5] * len(second)
        assert [m["role"] for m in s.messages] == ["assistant", "user", "assistant"] and s.calls == 2
    rollouts = grpo.Rollouts(problems=[problems[s.prompt_index] for s in samples],
                             prompt_ids=[prompts[s.prompt_index] for s in samples],
                             completion_ids=[s.token_ids for s in samples], old_logprobs=[s.logprobs for s in samples],
                             texts=[s.text for s in samples], truncated=[False] * 4,
                             model_mask=[s.model_mask for s in samples], conversations=[s.messages for s in samples])
    [batch] = grpo.make_micro_batches(rollouts, grpo.torch.ones(4), grpo.torch.ones(4, dtype=grpo.torch.bool),
                                      GRPOConfig(micro_batch_size=4), TOK.pad_id, "cpu")
    n = len(first)
    assert not batch.trained[:, n : n + len(delta)].any() and batch.trained[:, :n].all()  # loss mask 0 on the env's
    result = grpo.score_rollouts(env, rollouts, GRPOConfig(template="r1zero"), TOK)
    assert result.components["correct"] == [1.0] * 4 and result.total == [1.5] * 4


@needs_verifiers
def test_a_failing_or_hanging_env_is_counted_and_the_run_goes_on(packages, monkeypatch):
    env = get_task("verifiers:guess_env")
    problems = env.problems("train", 2, 0)

    hang = threading.Event()  # released when the test ends: a thread left sleeping would hold up pytest's exit

    def rewards(problem, messages):
        if problem is problems[1]:
            hang.wait(10)
        raise RuntimeError("the env broke")

    monkeypatch.setattr(env, "reply", lambda problem, messages: 1 / 0)
    turns = EnvTurns(env, problems, TOK, "r1zero", timeout_s=0.5)
    samples = generate_with_tools(ScriptedEngine(), [TOK.encode(p.prompt) for p in problems], turns, max_new_tokens=99)
    assert [(s.calls, s.failures, len(s.messages)) for s in samples] == [(1, 1, 1), (1, 1, 1)]  # the episode ended
    monkeypatch.setattr(env, "rewards", rewards)
    with pytest.warns(RuntimeWarning, match="the env broke"):
        result = score_completions(env, problems, [s.messages for s in samples], timeout_s=0.5)
    hang.set()
    assert (result.total, result.errors, result.timeouts) == ([0.0, 0.0], 1, 1)


# ---------------------------------------------------------------------------------------------------------------
# end to end: `r1lab grpo --task verifiers:...` on the tiny model, as a user runs it


def run_cli(packages, *args):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(packages), str(ROOT)])}
    done = subprocess.run([sys.executable, "-m", "r1lab", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def grpo_metrics(packages, tiny_base, out, task, *extra):
    run_cli(packages, "grpo", "--model", str(tiny_base), "--out", str(out), "--task", task, "--steps", "2",
            "--prompts-per-step", "2", "--samples-per-prompt", "4", "--eval-every", "0", "--save-every", "0",
            "--device", "cpu", *extra)
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
@needs_verifiers
def test_grpo_trains_a_single_turn_verifiers_env(packages, tiny_base, tmp_path):
    rows = grpo_metrics(packages, tiny_base, tmp_path / "run", "verifiers:sums_env", "--task-options",
                        "{num_examples: 30}", "--max-new-tokens", "24")
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert r["reward/mean"] == pytest.approx(r["reward/correct"] + 0.5 * r["reward/tagged"], abs=1e-6)
        assert r["scorer_errors"] == 0 and "reward/format" not in r
    assert any(r["reward/tagged"] > 0 for r in rows)  # the tiny base writes <answer> tags: the rubric sees them


@pytest.mark.slow
@needs_verifiers
def test_grpo_trains_a_multi_turn_verifiers_env_never_on_its_tokens(packages, tiny_base, tmp_path):
    rows = grpo_metrics(packages, tiny_base, tmp_path / "run", "verifiers:guess_env", "--max-new-tokens", "100")
    for r in rows:
        total = r["reward/correct"] + 0.5 * r["reward/tagged"] + 0.5 * r["reward/first_try"]
        assert r["reward/mean"] == pytest.approx(total, abs=1e-6) and r["scorer_errors"] == 0
    assert any(r["env/calls_per_rollout"] > 0 and r["env/output_token_share"] > 0 for r in rows)
    samples = [json.loads(line) for f in sorted((tmp_path / "run" / "samples").glob("*.jsonl"))
               for line in f.read_text().splitlines()]
    assert any("try again" in s["completion"] for s in samples)  # the env's feedback, in the completion as read
    out = tmp_path / "eval.json"
    run_cli(packages, "eval", "--model", str(tmp_path / "run" / "model"), "--task", "verifiers:guess_env", "--problems",
            "3", "--samples", "2", "--max-new-tokens", "100", "--device", "cpu", "--out", str(out))
    assert json.loads(out.read_text())["test"]["n_problems"] == 3
