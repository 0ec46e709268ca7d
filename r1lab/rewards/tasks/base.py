"""What every task provides: problems (generated or read from a file) and a scorer.

The scorer is shared by the RL reward and by evaluation, so what is trained is what is reported.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol


class DatasetError(ValueError):
    """A dataset that cannot be used; the message lists each bad row as file:line: problem."""


@dataclass
class Problem:
    prompt: str  # the question, inserted into the chat/R1 template
    answer: str  # the reference answer, as text
    meta: dict = field(default_factory=dict)  # task-specific data (countdown: numbers and target)
    # a conversational prompt (TRL's list of {role, content}, ending with the user's turn): rendered whole; prompt
    # is then its last user message
    messages: list[dict] | None = None


class Task(Protocol):
    name: str

    def problems(self, split: str, n: int, seed: int) -> list[Problem]:
        """n problems of split 'train' or 'test' (disjoint sets), deterministic for a seed."""
        ...

    def score(self, problem: Problem, answer: str) -> float:
        """Accuracy in [0, 1] of an extracted answer (the <answer> content) against the problem."""
        ...

    def canonical(self, answer: str) -> str:
        """A normalised form of an answer, used for majority voting (cons@k)."""
        ...
