"""`--task agent:MODULE:FUNCTION`: a Python agent that calls the model through an OpenAI client, as an r1lab task.

`async def FUNCTION(client, model, problem)` talks to the policy with `client` (an `openai.AsyncOpenAI` bound to its
rollout) as `model`, and returns its reward: a number, or named components whose "reward" is the total. The problems
are another task's: `--task-options '{problems: SPEC, problem_options: {...}, timeout_s: 300}'`.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import json
import math
import threading
from collections import defaultdict
from collections.abc import Mapping
from typing import Any

from r1lab.rewards.environments import EnvReply, is_environment_spec
from r1lab.rewards.tasks import get_task
from r1lab.rewards.tasks.base import Problem


def load(name: str, problems: str = "", problem_options: dict | None = None, timeout_s: float = 300.0,
         **unknown: Any) -> AgentEnvironment:
    spec = f"agent:{name}"
    if unknown:
        raise ValueError(f"--task {spec}: unknown task options {', '.join(sorted(unknown))} (problems, "
                         "problem_options, timeout_s)")
    if not problems or is_environment_spec(problems):
        raise ValueError(f"--task {spec} needs the task its problems come from, not an environment: --task-options "
                         "'{problems: arithmetic}' (a task name, data file or dataset)")
    if importlib.util.find_spec("openai") is None:
        raise ValueError(f"--task {spec} hands its agent an OpenAI client: pip install 'r1lab[judge]' (openai)")
    module, _, function = name.rpartition(":")
    try:
        agent = getattr(importlib.import_module(module), function) if module else None
    except (ImportError, AttributeError) as err:
        raise ValueError(f"--task {spec}: cannot load the agent: {type(err).__name__}: {err}") from None
    if not inspect.iscoroutinefunction(agent):
        raise ValueError(f"--task {spec}: name an `async def FUNCTION(client, model, problem)` as MODULE:FUNCTION")
    return AgentEnvironment(spec, agent, get_task(problems, **(problem_options or {})), float(timeout_s))


class AgentEnvironment:
    """An r1lab Environment whose rollouts its agent drives; each run's reward is kept for scoring its sample."""

    max_turns = 1  # the agent, not r1lab, decides how many turns it takes

    def __init__(self, name: str, agent, task, timeout_s: float) -> None:
        self.name, self.agent, self.task, self.timeout_s = name, agent, task, timeout_s
        self._rewards: dict[str, list[dict]] = defaultdict(list)
        self._lock = threading.Lock()

    def problems(self, split: str, n: int | None, seed: int) -> list[Problem]:
        return self.task.problems(split, n, seed)

    def canonical(self, answer: str) -> str:
        return answer.strip()

    def score(self, problem: Problem, answer: str) -> float:
        raise ValueError(f"{self.name}: a reward is its agent's run's, not a completion's")

    def reply(self, problem: Problem, messages: list[dict]) -> EnvReply:
        raise ValueError(f"{self.name}: its agent drives its turns (r1lab/engine/agents.py)")

    async def run(self, client, model: str, problem: Problem) -> dict[str, float]:
        """One run of the agent and its reward, as components (a bad return raises, counted as the agent's error)."""
        try:
            value = await self.agent(client, model, problem)
        except SystemExit as err:  # would end the event loop of every rollout, not this one's run
            raise RuntimeError(f"the agent called exit({err})") from None
        try:
            rewards = {k: float(v) for k, v in value.items()} if isinstance(value, Mapping) else \
                {"reward": float(value)}
        except (TypeError, ValueError):
            rewards = {}
        if "reward" not in rewards or not all(map(math.isfinite, rewards.values())):
            raise ValueError(f"the agent returned {value!r}: a finite number, or components with a 'reward' total")
        return rewards

    def record(self, messages: list[dict], rewards: dict[str, float]) -> None:
        """Keep a run's rewards for the scoring of its conversation (problem prompt + the turns as served)."""
        with self._lock:
            self._rewards[json.dumps(messages)].append(rewards)

    def rewards(self, problem: Problem, messages: list[dict]) -> dict[str, float]:
        with self._lock:  # runs of the same conversation are the same sample: any of their rewards is its
            recorded = self._rewards.get(json.dumps(messages))
            if not recorded:
                raise ValueError(f"{self.name}: no run of its agent recorded this conversation")
            rewards = recorded.pop()
            if not recorded:
                del self._rewards[json.dumps(messages)]
            return rewards
