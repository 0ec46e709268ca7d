"""The GRPO objective as pure tensor functions: group-relative advantages, the policy-gradient term (PPO's clipped
ratio, CISPO or GSPO), k3 KL, the sampler/trainer mismatch correction (TIS / MIS), and the per-token weights that
implement each loss normalisation. Tested against hand-computed values.
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


POLICY_LOSSES = ("ppo-clip", "cispo", "gspo")
MISMATCH_CORRECTIONS = ("none", "tis", "mis")


def policy_loss(kind: str, logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, clip_low: float,
                clip_high: float, sequence: torch.Tensor | None = None):
    """Per-token policy-gradient loss (N,) and where the ratio was clipped (N,), for tokens flattened over sequences.

    ppo-clip: -min(r A, clip(r, 1-low, 1+high) A), r = pi/pi_old per token (GRPO, DAPO); a clipped token gets no
              gradient.
    cispo:    -sg(clip(r, 1-low, 1+high)) A log pi (MiniMax-M1): the importance weight is clipped and detached, so
              every token keeps a gradient, of size at most 1+high.
    gspo:     the PPO clip on the sequence's ratio s_i = exp(mean over its tokens of log pi - log pi_old) (Qwen's
              GSPO): -min(s_i A_i, clip(s_i) A_i) on each of its tokens, s_i's gradient spread evenly over them.
              sequence (N,) says which sequence each token belongs to.
    """
    if kind == "ppo-clip":
        loss, clipped, _ = clipped_surrogate_loss(logp, old_logp, advantages, clip_low, clip_high)
        return loss, clipped
    ratio = torch.exp(logp - old_logp)
    if kind == "cispo":
        weight = ratio.detach().clamp(1 - clip_low, 1 + clip_high)
        clipped = (ratio.detach() < 1 - clip_low) | (ratio.detach() > 1 + clip_high)
        return -weight * advantages * logp, clipped
    if kind == "gspo":
        if sequence is None:
            raise ValueError("gspo needs each token's sequence index")
        n = int(sequence.max()) + 1 if len(sequence) else 0
        lengths = torch.zeros(n, dtype=logp.dtype, device=logp.device).index_add_(0, sequence, torch.ones_like(logp))
        log_ratio_sum = torch.zeros(n, dtype=logp.dtype, device=logp.device).index_add_(0, sequence, logp - old_logp)
        seq_ratio = torch.exp(log_ratio_sum / lengths.clamp(min=1))[sequence]  # (N,): s_i on each of its tokens
        loss = -torch.min(seq_ratio * advantages, seq_ratio.clamp(1 - clip_low, 1 + clip_high) * advantages)
        clipped = ((seq_ratio < 1 - clip_low) & (advantages < 0)) | ((seq_ratio > 1 + clip_high) & (advantages > 0))
        return loss, clipped
    raise ValueError(f"unknown policy loss {kind!r} (one of {', '.join(POLICY_LOSSES)})")


def mismatch_weights(trainer_logp: torch.Tensor, sampler_logp: torch.Tensor, kind: str, cap: float) -> torch.Tensor:
    """Per-token importance weights (detached) for the gap between the trainer's and the sampler's probabilities of
    the same tokens under the same weights (bf16 sampling, other kernels): w = pi_trainer / pi_sampler, truncated at
    cap (TIS) or, past the cap, zero (MIS: such tokens are dropped). Multiplies the policy-gradient term."""
    ratio = torch.exp(trainer_logp.detach() - sampler_logp)
    if kind == "tis":
        return ratio.clamp(max=cap)
    if kind == "mis":
        return torch.where(ratio <= cap, ratio, torch.zeros_like(ratio))
    raise ValueError(f"unknown mismatch correction {kind!r} (one of tis, mis)")


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """k3 estimator of KL(pi || ref) per token: unbiased and never negative."""
    log_r = ref_logp - logp
    return torch.exp(log_r) - log_r - 1
