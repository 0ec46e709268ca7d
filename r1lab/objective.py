"""The GRPO objective as pure tensor functions: group-relative advantages, the clipped surrogate, k3 KL, and the
per-token weights that implement each loss normalisation. Tested against hand-computed values.
"""

from __future__ import annotations

import torch


def group_advantages(rewards: torch.Tensor, group_size: int, scale_by_std: bool = True, eps: float = 1e-4) -> torch.Tensor:
    """A_i = (r_i - mean(group)) / (std(group) + eps); without std scaling (Dr. GRPO) just r_i - mean(group).

    rewards (N,) are ordered group by group (N = groups x group_size). std is the sample std (n - 1), as in TRL.
    """
    r = rewards.view(-1, group_size)  # (groups, G)
    centered = r - r.mean(-1, keepdim=True)
    if scale_by_std:
        centered = centered / (r.std(-1, keepdim=True) + eps)
    return centered.reshape(-1)


def uniform_groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """(groups,) True where every reward in the group is equal: zero advantage, zero gradient."""
    r = rewards.view(-1, group_size)
    return (r == r[:, :1]).all(-1)


def token_weights(lengths: torch.Tensor, norm: str, max_new_tokens: int) -> torch.Tensor:
    """Per-sequence weight of each of its tokens, so that sum(weight * token_loss) is the normalised batch loss.

    token:    every completion token of the batch counts the same (DAPO; no length bias)
    sequence: mean over each sequence's tokens, then mean over sequences (the original GRPO)
    constant: divide by sequences x max_new_tokens (Dr. GRPO)
    """
    n = len(lengths)
    if norm == "token":
        return torch.full((n,), 1.0 / max(1, int(lengths.sum())))
    if norm == "sequence":
        return 1.0 / (lengths.clamp(min=1).float() * n)
    if norm == "constant":
        return torch.full((n,), 1.0 / (n * max_new_tokens))
    raise ValueError(f"unknown loss normalisation {norm!r}")


def clipped_surrogate_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor,
                           clip_low: float, clip_high: float, ref_logp: torch.Tensor | None = None,
                           kl_coef: float = 0.0):
    """Per-token loss and per-token stats: -min(rho A, clip(rho, 1-low, 1+high) A) + kl_coef * KL_k3.

    logp, old_logp, ref_logp: log-probs of the sampled tokens, (N,) or (B, T); advantages: one per token (same
    shape), or (B,) to broadcast over a (B, T) batch.
    """
    adv = advantages if advantages.shape == logp.shape else advantages[:, None]
    ratio = torch.exp(logp - old_logp)  # (B, T)
    clipped = ratio.clamp(1 - clip_low, 1 + clip_high)
    loss = -torch.min(ratio * adv, clipped * adv)
    was_clipped = ((ratio < 1 - clip_low) & (adv < 0)) | ((ratio > 1 + clip_high) & (adv > 0))
    kl = None
    if ref_logp is not None and kl_coef:
        # k3 estimator of KL(pi || ref): unbiased and never negative
        log_r = ref_logp - logp
        kl = torch.exp(log_r) - log_r - 1
        loss = loss + kl_coef * kl
    return loss, was_clipped, kl
