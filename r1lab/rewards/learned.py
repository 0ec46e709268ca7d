"""Rewards that a model gives (an LLM judge, a reward model), added to score_completions' result as weighted
components (`reward/judge`, `reward/reward_model`), their failures counted; each scorer is built once per run.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Sequence

from r1lab.rewards.llm_judge import Judge, JudgeSettings
from r1lab.rewards.reward_model import RewardModel, RewardModelSettings
from r1lab.rewards.rules import RewardResult
from r1lab.rewards.tasks.base import Problem


@dataclass(frozen=True)
class LearnedRewards:
    judge: JudgeSettings | None = None
    judge_weight: float = 1.0
    reward_model: RewardModelSettings | None = None
    reward_model_weight: float = 1.0


_judge = lru_cache(maxsize=4)(Judge)  # one scorer per settings, built once
_reward_model = lru_cache(maxsize=2)(RewardModel)


def add_learned_rewards(result: RewardResult, learned: LearnedRewards, problems: Sequence[Problem],
                        completions: Sequence[str], response_prefix: str = "") -> RewardResult:
    """result with the judge's and the reward model's components added (in place, and returned)."""
    texts = [response_prefix + (c if isinstance(c, str) else "") for c in completions]
    prompts = [p.prompt for p in problems]
    if learned.judge is not None:
        judged = _judge(learned.judge).score(prompts, [p.answer for p in problems], texts)
        _add(result, "judge", learned.judge_weight, judged.scores)
        result.errors += judged.errors
        result.timeouts += judged.timeouts
    if learned.reward_model is not None:
        scores, errors = _reward_model(learned.reward_model).score(prompts, texts)
        _add(result, "reward_model", learned.reward_model_weight, scores)
        result.errors += errors
    return result


def _add(result: RewardResult, name: str, weight: float, values: list[float]) -> None:
    result.components[name] = values
    result.total = [t + weight * v for t, v in zip(result.total, values)]
