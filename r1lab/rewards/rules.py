"""Rule-based rewards (R1 recipe section 3): accuracy and format (extracted and checked in r1lab/rewards/answers.py,
per answer format), and a scorer that never raises.

Every pitfall listed in the recipe is handled here: the format regex is DOTALL, there is no fallback to the
whole text when the <answer> tag is missing, empty answers earn nothing, multi-line answers are kept whole, and
a scorer that raises or hangs costs that one completion its reward instead of killing the run.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Callable, Sequence

from r1lab.rewards.answers import check_answer_format, extract_answer, format_reward
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
    functions: tuple[tuple[str, float], ...] = ()  # your own: ("module:function", weight), r1lab/rewards/user_functions.py

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
        self.timeout_s = timeout_s
        self.errors = 0
        self.timeouts = 0

    def run(self, fn: Callable[[], float]) -> float:
        try:
            value = float(call_with_timeout(fn, self.timeout_s))
        except _ScorerTimeout:
            self.timeouts += 1
            return 0.0
        except Exception:
            self.errors += 1
            return 0.0
        if value != value:  # NaN would poison the group's advantage statistics
            self.errors += 1
            return 0.0
        return value

    def record(self, spec: str, outcome: Outcome, what: str = "reward function") -> float:
        """The reward of one user-function call run in a worker (r1lab/rewards/user_functions.py) or of an
        environment's episode, failures counted."""
        kind, value = outcome
        if kind == "ok":
            return value
        if kind == "timeout":
            self.timeouts += 1
            _warn_once(f"{what} {spec}", "timeout", value or f"ran past the {self.timeout_s:g} s timeout")
        else:
            self.errors += 1
            _warn_once(f"{what} {spec}", "error", value)
        return 0.0


_WARNED: set[tuple[str, str]] = set()


def _warn_once(source: str, kind: str, reason: str) -> None:
    """Counters say how often a function fails; one message per function and kind says why, without a flood."""
    if (source, kind) not in _WARNED:
        _WARNED.add((source, kind))
        warnings.warn(f"{source}: {reason}; it scores 0 and is counted in scorer_{kind}s (reported once)",
                      RuntimeWarning)


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


def _environment_rewards(task: Task, problems: Sequence[Problem], texts: list[str],
                         tally: _Tally) -> tuple[list[float], dict[str, list[float]]]:
    """An environment's (r1lab/rewards/environments) rewards of single-turn conversations: each one's 'reward' and
    its other components by name; an environment that fails or times out gives that conversation 0, counted."""
    outcomes = []
    for i, text in enumerate(texts):
        problem = problems[i] if i < len(problems) else None
        prompt = (problem.messages or [{"role": "user", "content": problem.prompt}]) if problem else []
        try:
            got = {k: float(v) for k, v in task.rewards(problem, [*prompt, {"role": "assistant", "content": text}]).items()}
            if not all(map(math.isfinite, got.values())):  # would poison the group's advantage statistics
                raise ValueError(f"a reward is not a finite number: {got}")
            outcomes.append(got)
        except Exception as err:  # the environment's failure costs this conversation its reward, never the run
            kind = "timeout" if isinstance(err, TimeoutError) else "error"
            tally.record(task.name, (kind, f"{type(err).__name__}: {err}"), "environment")
            outcomes.append({})
    names = sorted({name for got in outcomes for name in got} - {"reward"})
    return [got.get("reward", 0.0) for got in outcomes], {n: [got.get(n, 0.0) for got in outcomes] for n in names}


def score_completions(task: Task, problems: Sequence[Problem], completions: Sequence[str],
                      weights: RewardWeights = RewardWeights(), timeout_s: float = 5.0,
                      response_prefix: str = "", answer_format: str = "tags") -> RewardResult:
    """Accuracy and format rewards (and language consistency, when weighted) of each completion; problems[i] is
    the problem of completions[i].

    response_prefix is response text the prompt already supplied (a prefilled "<think>", or the `<think>` a chat
    template opens): the format is judged on prefix + completion, and the answer is extracted from the same text,
    as answer_format says (r1lab/rewards/answers.py).
    """
    tally = _Tally(timeout_s)
    environment = hasattr(task, "rewards")  # it scores the conversation itself: its reward stands for accuracy
    prefix = response_prefix if isinstance(response_prefix, str) else ""
    fmt_name, code = check_answer_format(answer_format), getattr(task, "answers_are_code", False)
    acc, fmt, lang, texts, answers = [], [], [], [], []
    for i, completion in enumerate(completions):
        text = prefix + (completion if isinstance(completion, str) else "")
        texts.append(text)
        answer = extract_answer(text, fmt_name, code)
        problem = problems[i] if i < len(problems) else None
        answers.append(answer)
        acc.append(0.0 if environment else _accuracy(task, problem, answer, tally))
        fmt.append(tally.run(lambda: format_reward(text, fmt_name, code)))
        if weights.language:
            lang.append(tally.run(lambda: language_consistency(text, weights.target_language)))
    custom = _user_rewards(weights, problems, texts, tally)
    acc, by_name = _environment_rewards(task, problems, texts, tally) if environment else (acc, {})
    total = [weights.accuracy * a + weights.format * f for a, f in zip(acc, fmt)]
    components = {"accuracy": acc, "format": fmt, **by_name}
    if weights.language:
        total = [t + weights.language * g for t, g in zip(total, lang)]
        components["language"] = lang
    for spec, weight in weights.functions:
        total = [t + weight * v for t, v in zip(total, custom[spec])]
        components[component_name(spec)] = custom[spec]
    correct = [a > 0 if environment else a == 1.0 for a in acc]  # an environment's reward may be any size
    return RewardResult(total=total, components=components, correct=correct, answers=answers,
                        errors=tally.errors, timeouts=tally.timeouts)
