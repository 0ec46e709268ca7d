"""The GRPO objective as pure tensor functions: advantages, policy losses, k3 KL, mismatch correction, normalisation."""

from __future__ import annotations

import torch

POLICY_LOSSES = ("ppo-clip", "cispo", "gspo")


def group_advantages(rewards: torch.Tensor, group_size: int, scale_by_std: bool = True,
                     eps: float = 1e-4) -> torch.Tensor:
    """(r_i - mean(group)) / (std(group) + eps) (sample std, as TRL); without scaling (Dr. GRPO) r_i - mean."""
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
    """Per-sequence token weights so sum(weight * token_loss) is the batch loss normalised by token (DAPO), sequence
    (GRPO) or constant (Dr. GRPO: sequences x max_new_tokens)."""
    n = len(lengths)
    if norm == "token":
        return torch.full((n,), 1.0 / max(1, int(lengths.sum())))
    if norm == "sequence":
        return 1.0 / (lengths.clamp(min=1).float() * n)
    if norm == "constant":
        return torch.full((n,), 1.0 / (n * max_new_tokens))
    raise ValueError(f"unknown loss normalisation {norm!r}")


def _clip(ratio: torch.Tensor, adv: torch.Tensor, clip_low: float, clip_high: float):
    """-min(r A, clip(r, 1-low, 1+high) A) and where the clip took the gradient away."""
    loss = -torch.min(ratio * adv, ratio.clamp(1 - clip_low, 1 + clip_high) * adv)
    return loss, ((ratio < 1 - clip_low) & (adv < 0)) | ((ratio > 1 + clip_high) & (adv > 0))


def clipped_surrogate_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor,
                           clip_low: float, clip_high: float, ref_logp: torch.Tensor | None = None,
                           kl_coef: float = 0.0):
    """Per-token PPO-clip loss + kl_coef * KL_k3, where it was clipped, and the KL; advantages may broadcast."""
    adv = advantages if advantages.shape == logp.shape else advantages[:, None]
    loss, was_clipped = _clip(torch.exp(logp - old_logp), adv, clip_low, clip_high)
    kl = k3_kl(logp, ref_logp) if ref_logp is not None and kl_coef else None
    return (loss if kl is None else loss + kl_coef * kl), was_clipped, kl


def policy_loss(kind: str, logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, clip_low: float,
                clip_high: float, sequence: torch.Tensor | None = None):
    """Per-token loss (N,) and where the ratio was clipped: ppo-clip per token; cispo -sg(clip(r)) A log pi
    (MiniMax-M1); gspo clips the sequence's geometric-mean ratio (sequence: each token's sequence index)."""
    if kind == "ppo-clip":
        return clipped_surrogate_loss(logp, old_logp, advantages, clip_low, clip_high)[:2]
    ratio = torch.exp(logp - old_logp)
    if kind == "cispo":
        weight = ratio.detach().clamp(1 - clip_low, 1 + clip_high)
        return -weight * advantages * logp, (ratio.detach() < 1 - clip_low) | (ratio.detach() > 1 + clip_high)
    if kind == "gspo":
        if sequence is None:
            raise ValueError("gspo needs each token's sequence index")
        n = int(sequence.max()) + 1 if len(sequence) else 0
        lengths = torch.zeros(n, dtype=logp.dtype, device=logp.device).index_add_(0, sequence, torch.ones_like(logp))
        log_ratio_sum = torch.zeros(n, dtype=logp.dtype, device=logp.device).index_add_(0, sequence, logp - old_logp)
        return _clip(torch.exp(log_ratio_sum / lengths.clamp(min=1))[sequence], advantages, clip_low, clip_high)
    raise ValueError(f"unknown policy loss {kind!r} (one of {', '.join(POLICY_LOSSES)})")


def mismatch_kind(cfg) -> str:
    """The mismatch correction in force: auto is TIS with async rollouts, else none."""
    return cfg.mismatch_correction if cfg.mismatch_correction != "auto" else "tis" if cfg.async_steps else "none"


def mismatch_weights(trainer_logp: torch.Tensor, sampler_logp: torch.Tensor, kind: str, cap: float) -> torch.Tensor:
    """Detached per-token pi_trainer / pi_sampler, truncated at cap (TIS) or zeroed past it (MIS)."""
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
