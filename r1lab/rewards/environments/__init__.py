"""Environments of other standards (verifiers, OpenEnv) as r1lab tasks: `--task verifiers:ENV`, `--task openenv:ENV`.

An environment is a Task (its problems are the prompts) that also answers each policy turn and scores the whole
conversation. Its messages are context the policy attends to but is never trained on, like tool results.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from r1lab.rewards.tasks.base import Problem, Task


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
