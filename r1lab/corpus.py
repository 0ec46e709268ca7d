"""The synthetic pretraining corpus: a base model that can reason, but does not reliably choose to.

Each document is an R1-Zero prompt for an arithmetic problem and one response, in one of three styles:
- worked ("think" share): the expression is rewritten step by step, adding the first two terms each time
  (3+5+2+7 -> "8+2+7=10+7=17"); a share of these solutions slips once (a step is off by one or two, and the error
  carries through to the answer), as careless reasoning does;
- guessed (most of the rest): a one-line thought and the value of another random problem of the same size, so a
  guess is right by chance only, however well the model knows the sum;
- untagged (a few): the answer in plain text, without the <think>/<answer> format.

A model pretrained on this mix writes correct worked solutions often enough that pass@8 is high, while its pass@1 is
low because it usually guesses: exactly the situation where RL with a verifier helps, and where the learned
behaviour is to think longer. Only train-split problems are used, so held-out problems stay unseen.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from r1lab.tasks.arithmetic import ArithmeticTask, evaluate, render
from r1lab.tasks.base import Problem

GUESS_THOUGHT = "I can see it."


@dataclass
class CorpusMix:
    think_share: float = 0.3  # worked solutions
    slip_rate: float = 0.2  # worked solutions with one wrong step
    untagged_share: float = 0.05  # answers given without the format


def worked_steps(terms: list[int], ops: list[str], rng: random.Random | None = None, slip: bool = False) -> list[str]:
    """Successive rewritings of the expression, each folding the first two terms; one may slip when asked."""
    if "*" in ops:
        raise ValueError("the worked-solution corpus covers + and - only")
    terms, ops = list(terms), list(ops)
    slip_at = rng.randrange(len(ops)) if slip and rng else -1
    steps = []
    for i in range(len(ops)):
        first = evaluate(terms[:2], ops[:1])
        if i == slip_at:
            first += rng.choice([-2, -1, 1, 2])
        terms, ops = [first, *terms[2:]], ops[1:]
        steps.append(render(terms, ops))
    return steps


def response(problem: Problem, rng: random.Random, mix: CorpusMix) -> str:
    """One response text in the corpus style, starting right after the prompt's "Assistant:"."""
    u = rng.random()
    if u < mix.think_share:
        steps = worked_steps(problem.meta["terms"], problem.meta["ops"], rng, slip=rng.random() < mix.slip_rate)
        return f" <think>{'='.join(steps)}</think> <answer>{steps[-1]}</answer>"
    look_alike = [rng.randint(10 ** (len(str(t)) - 1), 10 ** len(str(t)) - 1) for t in problem.meta["terms"]]
    guess = evaluate(look_alike, problem.meta["ops"])
    if u < mix.think_share + mix.untagged_share:
        return f" The answer is {guess}."
    return f" <think>{GUESS_THOUGHT}</think> <answer>{guess}</answer>"


def arithmetic_corpus(task: ArithmeticTask, n: int, seed: int, mix: CorpusMix | None = None) -> list[tuple[Problem, str]]:
    """n (problem, response) pairs drawn from the train split."""
    mix = mix or CorpusMix()
    rng = random.Random(seed)
    return [(p, response(p, rng, mix)) for p in task.problems("train", n, seed)]
