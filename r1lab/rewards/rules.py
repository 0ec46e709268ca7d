"""Rule-based rewards (R1 recipe section 3): accuracy and format (r1lab/rewards/answers.py), language consistency and
users' functions, summed by weight; a scorer that raises or hangs costs that one completion its reward, not the run.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Callable, Sequence

from r1lab.rewards.answers import check_answer_format, extract_answer, format_reward
from r1lab.rewards.environments import call_all, is_environment
from r1lab.rewards.language import check_target, language_consistency
from r1lab.rewards.tasks.base import Problem, Task
from r1lab.rewards.user_functions import (Outcome, _ScorerTimeout, call_with_timeout, component_name,
                                          load_reward_function, reward_workers)


@dataclass
class RewardWeights:
    accuracy: float = 1.0
    format: float = 1.0
    language: float = 0.0  # R1 stage 2: share of the chain of thought in target_language (r1lab/rewards/language.py)
    target_language: str = "en"
    functions: tuple[tuple[str, float], ...] = ()  # your own: ("module:function", weight), user_functions.py

    def __post_init__(self) -> None:
        if self.language:
            check_target(self.target_language)  # an unknown language fails at once, not as a reward of 0
        for spec, _ in self.functions:
            load_reward_function(spec)  # likewise a function that cannot be loaded


@dataclass
class RewardResult:
    total: list[float]
    components: dict[str, list[float]]  # "accuracy", "format" (+ "language", your functions' names), one each
    correct: list[bool]
    answers: list[str | None]
    errors: int  # scorer calls that raised
    timeouts: int  # scorer calls interrupted after timeout_s


class _Tally:
    """Counts scorer failures while turning them into a 0.0 component."""

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s, self.errors, self.timeouts = timeout_s, 0, 0

    def run(self, fn: Callable[[], float]) -> float:
        try:
            value = float(call_with_timeout(fn, self.timeout_s))
        except _ScorerTimeout:
            self.timeouts += 1
            return 0.0
        except Exception:
            value = math.nan
        if value != value:  # it raised, or NaN, which would poison the group's advantage statistics
            self.errors += 1
            return 0.0
        return value

    def record(self, spec: str, outcome: Outcome) -> float:
        kind, value = outcome
        if kind == "ok":
            return value
        if kind == "timeout":
            self.timeouts += 1
            value = f"ran past the {self.timeout_s:g} s timeout"
        else:
            self.errors += 1
        if (spec, kind) not in _WARNED:  # counters say how often; one message per function and kind says why
            _WARNED.add((spec, kind))
            warnings.warn(f"reward function {spec}: {value}; it scores 0 and is counted in scorer_{kind}s "
                          f"(reported once)", RuntimeWarning)
        return 0.0


_WARNED: set[tuple[str, str]] = set()


def _accuracy(task: Task, problem: Problem | None, answer: str | None, tally: _Tally) -> float:
    if not answer:  # no tag, or an empty answer: nothing to score, never a substring match on nothing
        return 0.0
    if problem is None:  # fewer problems than completions: a caller bug, reported as an error
        tally.errors += 1
        return 0.0
    return tally.run(lambda: task.score(problem, answer))


def _user_rewards(weights: RewardWeights, problems: Sequence[Problem], texts: list[str],
                  tally: _Tally) -> dict[str, list[float]]:
    """Users' functions, run in worker processes so that nothing they do can end or hang the run."""
    if not weights.functions:
        return {}
    pairs = [(text, problems[i] if i < len(problems) else None) for i, text in enumerate(texts)]
    outcomes = reward_workers().score({spec: pairs for spec, _ in weights.functions}, tally.timeout_s)
    return {spec: [tally.record(spec, o) for o in outcomes[spec]] for spec, _ in weights.functions}


def score_completions(task: Task, problems: Sequence[Problem], completions: Sequence[str],
                      weights: RewardWeights = RewardWeights(), timeout_s: float = 5.0,
                      response_prefix: str = "", answer_format: str = "tags") -> RewardResult:
    """The rewards of each completions[i] for problems[i], judged on response_prefix (the response text the prompt
    already wrote, such as `<think>`) + completion."""
    if is_environment(task):
        return score_environment(task, problems, completions, timeout_s)
    tally = _Tally(timeout_s)
    prefix = response_prefix if isinstance(response_prefix, str) else ""
    fmt_name, code = check_answer_format(answer_format), getattr(task, "answers_are_code", False)
    texts = [prefix + (c if isinstance(c, str) else "") for c in completions]
    answers = [extract_answer(text, fmt_name, code) for text in texts]
    acc = [_accuracy(task, problems[i] if i < len(problems) else None, a, tally) for i, a in enumerate(answers)]
    fmt = [tally.run(lambda: format_reward(text, fmt_name, code)) for text in texts]
    total = [weights.accuracy * a + weights.format * f for a, f in zip(acc, fmt)]
    components = {"accuracy": acc, "format": fmt}
    weighted = []
    if weights.language:
        lang = [tally.run(lambda: language_consistency(text, weights.target_language)) for text in texts]
        weighted.append((weights.language, "language", lang))
    custom = _user_rewards(weights, problems, texts, tally)
    weighted += [(weight, component_name(spec), custom[spec]) for spec, weight in weights.functions]
    for weight, name, values in weighted:
        total = [t + weight * v for t, v in zip(total, values)]
        components[name] = values
    return RewardResult(total=total, components=components, correct=[a == 1.0 for a in acc], answers=answers,
                        errors=tally.errors, timeouts=tally.timeouts)


def score_environment(env, problems: Sequence[Problem], completions: Sequence, timeout_s: float) -> RewardResult:
    """An environment's rewards of each conversation (the turns after the prompt, or one completion's text): its
    'reward' is the total, the others are components; correct means a total of 1 or more."""
    turns = [[{"role": "assistant", "content": c}] if isinstance(c, str) else list(c) for c in completions]
    calls = [(p, [*(p.messages or [{"role": "user", "content": p.prompt}]), *t]) for p, t in zip(problems, turns)]
    outcomes = [("error", "a non-finite reward") if k == "ok" and not all(map(math.isfinite, v.values())) else (k, v)
                for k, v in call_all(env.rewards, calls, timeout_s, getattr(env, "sessions", 16))]
    scored = [value if kind == "ok" else {} for kind, value in outcomes]
    names = sorted({name for s in scored for name in s} - {"reward"})
    total = [float(s.get("reward", 0.0)) for s in scored]
    return RewardResult(total=total, components={n: [float(s.get(n, 0.0)) for s in scored] for n in names},
                        correct=[t >= 1.0 for t in total], answers=[t[-1]["content"] if t else None for t in turns],
                        errors=sum(k == "error" for k, _ in outcomes),
                        timeouts=sum(k == "timeout" for k, _ in outcomes))
