#!/usr/bin/env python
"""Throughput of the code reward: rewards/s of the built-in code task through r1lab.rewards.rules.score_completions.

Each reward runs the answer's tests in the sandbox (r1lab/rewards/sandbox/runner.py), so this measures the sandbox's cost per
completion: process start, isolation, one fresh run of the candidate per test. The completions are the problems'
own reference solutions in the reward format, so every one must score 1.0 (checked; a wrong score exits 1).

    python bench/code_reward.py                     # 200 completions, 6 tests each; bubblewrap where it works
    python bench/code_reward.py --sandbox landlock  # r1lab's own boundary (unshare, Landlock); or none
    PYTHONPATH=/path/to/older/checkout python bench/code_reward.py   # a before figure (--sandbox is ignored)

Run it once, on an otherwise quiet machine: on a shared 2-core machine a neighbour's load moves the figure.
"""

from __future__ import annotations

import argparse
import sys
import time

from r1lab.rewards.rules import RewardWeights, score_completions
from r1lab.rewards.sandbox import runner as sandbox
from r1lab.rewards.tasks import get_task


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=200, help="completions to score")
    parser.add_argument("--tests", type=int, default=6, help="tests per problem")
    parser.add_argument("--sandbox", default="auto", help="auto, bwrap, landlock or none (runner.SANDBOXES)")
    args = parser.parse_args()
    if hasattr(sandbox, "use_sandbox"):
        sandbox.use_sandbox(args.sandbox)
    task = get_task("code", tests_per_problem=args.tests)
    problems = task.problems("train", args.n, seed=0)
    completions = [f"<think>reference</think><answer>```python\n{p.answer}```</answer>" for p in problems]
    score_completions(task, problems[:2], completions[:2], RewardWeights(1.0, 0.0))  # warm-up: imports, caches
    started = time.perf_counter()
    result = score_completions(task, problems, completions, RewardWeights(1.0, 0.0), timeout_s=30)
    elapsed = time.perf_counter() - started
    wrong = sum(a != 1.0 for a in result.components["accuracy"])
    layers = ",".join(sandbox.run_tests("", ["assert True"]).layers) or sandbox.run_tests("", ["assert True"]).error
    print(f"{len(problems)} code rewards ({args.tests} tests each) in {elapsed:.2f} s: "
          f"{len(problems) / elapsed:.1f} rewards/s; {wrong} not scored 1.0; layers {layers}")
    return 1 if wrong or result.errors or result.timeouts else 0


if __name__ == "__main__":
    sys.exit(main())
