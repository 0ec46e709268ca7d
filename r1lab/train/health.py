"""Loud checks of a GRPO run's plumbing, on by default: each gives a metric every step and a warning line when it
goes wrong, because none of these failures shows in the loss.

- sync/policy_changed: the sampler's weights changed after an update that should have changed them (an update that
  was applied, with a gradient, at a learning rate above 0); 0 means rollouts keep coming from a stale policy (a weight sync that
  silently stopped, LoRA adapters that do not reach the sampler).
- importance_ratio/mean outside [RATIO_LOW, RATIO_HIGH]: the trained tokens were sampled by a policy far from the
  one trained (off-policy data, or a sampler that computes something else).
- logprob_diff/mean above LOGPROB_DRIFT: the sampler's and the trainer's log-probs of the same tokens on the same
  weights drift apart (precision, kernels, a template or tokenization mismatch).
Each warning is said when the check first fails, and again only after it has passed in between.
"""

from __future__ import annotations

import torch

RATIO_LOW, RATIO_HIGH = 0.9, 1.1
LOGPROB_DRIFT = 0.1  # nats per token, mean: float32 sampling agrees to ~1e-6, bf16 rollouts to ~1e-2
SAMPLES_PER_TENSOR = 4096


@torch.no_grad()
def weights_fingerprint(model: torch.nn.Module) -> float:
    """A cheap fingerprint of a model's weights: a float64 sum over an even sample of each parameter's entries
    (SAMPLES_PER_TENSOR of them), so that any update that moves the weights moves it."""
    total = 0.0
    for p in model.parameters():
        flat = p.detach().reshape(-1)
        stride = max(1, flat.numel() // SAMPLES_PER_TENSOR)
        total += float(flat[::stride].double().sum())
    return total


class RunHealth:
    """The checks' state across steps: which warnings are standing (said once until they clear)."""

    def __init__(self, log) -> None:
        self.log, self.standing = log, set()

    def check(self, step: int, metrics: dict, before: float | None, after: float | None, lr: float) -> dict:
        """The step's health metrics (added to metrics), with a warning for each check newly failing."""
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
