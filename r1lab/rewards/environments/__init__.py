"""Environments of other standards and agents as r1lab tasks: `--task verifiers:ENV`, `--task openenv:ENV`,
`--task agent:MODULE:FUNCTION`.

An environment is a Task (its problems are the prompts) that also answers each policy turn and scores the whole
conversation. Its messages are context the policy attends to but is never trained on, like tool results
(r1lab/engine/tools.py: EnvTurns). Each kind's adapter is a module here with load(name, **task_options).
"""

from __future__ import annotations

import importlib
import warnings
from concurrent.futures import ThreadPoolExecutor, TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

from r1lab.rewards.tasks.base import Problem, Task

ADAPTERS = {"verifiers": "verifiers_env", "openenv": "openenv_env", "agent": "agent_env"}  # --task KIND:NAME -> module


@dataclass
class EnvReply:
    messages: list[dict]  # the environment's turn ({role, content}): context for the next policy turn
    done: bool  # the episode is over: no more policy turns
    rewards: dict[str, float] = field(default_factory=dict)  # components the environment gave at this turn


class Environment(Task, Protocol):
    max_turns: int  # policy turns at most; 1: single-turn

    def reply(self, problem: Problem, messages: list[dict]) -> EnvReply:
        """The environment's answer to the conversation so far (prompt + policy turns + earlier replies)."""
        ...

    def rewards(self, problem: Problem, messages: list[dict]) -> dict[str, float]:
        """Reward components by name for a finished conversation; 'reward' is their weighted total."""
        ...


def is_environment_spec(spec: str) -> bool:
    return spec.partition(":")[0] in ADAPTERS and bool(spec.partition(":")[2])


def load_environment(spec: str, **options: Any) -> Environment:
    kind, _, name = spec.partition(":")
    return importlib.import_module(f"{__name__}.{ADAPTERS[kind]}").load(name, **options)


def is_environment(task: Any) -> bool:
    return callable(getattr(task, "reply", None)) and callable(getattr(task, "rewards", None))


def call_all(fn: Callable, calls: list[tuple], timeout_s: float, workers: int = 16) -> list[tuple[str, Any]]:
    """fn(*args) for each args in threads (an environment may wait on I/O): ("ok", value), ("error", message) or
    ("timeout", None) each, at most `workers` at once. A call past timeout_s is left behind, not waited for."""
    pool = ThreadPoolExecutor(max_workers=max(1, min(len(calls), workers)))
    futures = [pool.submit(fn, *args) for args in calls]
    outcomes = []
    for future in futures:
        try:
            outcomes.append(("ok", future.result(timeout=timeout_s)))
        except FutureTimeout:
            outcomes.append(("timeout", None))
        except Exception as err:  # noqa: BLE001 - an environment's failure costs its rollout, never the run
            outcomes.append(("error", f"{type(err).__name__}: {err}"))
    pool.shutdown(wait=False, cancel_futures=True)
    name = getattr(fn, "__qualname__", type(fn).__name__)
    for kind, value in outcomes:
        if kind != "ok" and (name, kind) not in _WARNED:  # counters say how often, one message why
            _WARNED.add((name, kind))
            warnings.warn(f"environment {name}: {value or f'ran past {timeout_s:g} s'}; counted in "
                          f"scorer_{kind}s, the rollout scores 0 or its episode ends (reported once)", RuntimeWarning)
    return outcomes


_WARNED: set[tuple[str, str]] = set()
