"""Checks of a GRPO run's plumbing whose failures the loss does not show (weight sync, importance ratio, log-prob
drift); each warns when it first fails, and again only after passing in between.
"""

from __future__ import annotations

import torch

RATIO_LOW, RATIO_HIGH = 0.9, 1.1
LOGPROB_DRIFT = 0.1  # nats per token, mean: float32 sampling agrees to ~1e-6, bf16 rollouts to ~1e-2
SAMPLES_PER_TENSOR = 4096


@torch.no_grad()
def weights_fingerprint(model: torch.nn.Module) -> float:
    """A cheap fingerprint of the weights: a float64 sum over an even sample of each parameter's entries."""
    total = 0.0
    for p in model.parameters():
        flat = p.detach().reshape(-1)
        stride = max(1, flat.numel() // SAMPLES_PER_TENSOR)
        total += float(flat[::stride].double().sum())
    return total


class RunHealth:
    """Which warnings are standing (said once until they clear)."""

    def __init__(self, log) -> None:
        self.log, self.standing = log, set()

    def check(self, step: int, metrics: dict, before: float | None, after: float | None, lr: float) -> dict:
        """The step's health metrics, warning for each check newly failing."""
        out, failing = {}, {}
        moved = lr > 0 and metrics.get("grad_norm", 1.0) > 0 and not metrics.get("skipped_nonfinite")
        if before is not None and after is not None and moved:
            out["sync/policy_changed"] = float(after != before)
            if after == before:
                failing["sync"] = ("the sampler's weights did not change after the update (a weight sync that "
                                   "stopped, or adapters that do not reach the sampler): rollouts come from a stale policy")
        ratio = metrics.get("importance_ratio/mean")
        if ratio is not None and not RATIO_LOW <= ratio <= RATIO_HIGH:
            failing["ratio"] = (f"the importance ratio's mean is {ratio:.3f}, outside [{RATIO_LOW}, {RATIO_HIGH}]: the "
                                "trained tokens come from a policy far from the one trained")
        drift = metrics.get("logprob_diff/mean")
        if drift is not None and drift > LOGPROB_DRIFT:
            failing["logprob"] = (f"the sampler's and the trainer's log-probs of the same tokens differ by {drift:.3f} "
                                  f"nats per token on average (more than {LOGPROB_DRIFT}): they do not compute the same "
                                  "policy (precision, kernels, or the prompt tokenized differently)")
        out["health/warnings"] = float(len(failing))
        for name, text in failing.items():
            if name not in self.standing:
                self.log(f"grpo: WARNING at step {step}: {text}")
        self.standing = set(failing)
        return out
