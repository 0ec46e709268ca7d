"""The GRPO objective against hand-computed values: advantages, clipping, k3 KL, loss normalisations."""

import math

import pytest
import torch

from r1lab.train.objective import (clipped_surrogate_loss, group_advantages, mismatch_weights, policy_loss,
                                   token_weights, uniform_groups)


def test_group_advantages_standardise_within_each_group():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0])
    adv = group_advantages(rewards, 4)
    std = math.sqrt(4 * 0.25 / 3)  # sample std of [1, 0, 0, 1]
    expected = 0.5 / (std + 1e-4)
    assert torch.allclose(adv, torch.tensor([expected, -expected, -expected, expected, 0, 0, 0, 0]), atol=1e-6)
    assert torch.equal(group_advantages(rewards, 4, scale_by_std=False), torch.tensor([.5, -.5, -.5, .5, 0, 0, 0, 0]))
    assert uniform_groups(rewards, 4).tolist() == [False, True]


def test_group_advantages_do_not_mix_groups():
    rewards = torch.tensor([3.0, 1.0, 10.0, 10.0])
    assert group_advantages(rewards, 2, scale_by_std=False).tolist() == [1.0, -1.0, 0.0, 0.0]


def test_clipped_surrogate_per_token_cases():
    logp = torch.log(torch.tensor([[1.5, 1.5, 0.5, 0.5]]))
    old = torch.zeros(1, 4)
    for adv, expected, clipped in [(1.0, [-1.2, -1.2, -0.5, -0.5], [True, True, False, False]),
                                   (-1.0, [1.5, 1.5, 0.8, 0.8], [False, False, True, True])]:
        loss, was_clipped, kl = clipped_surrogate_loss(logp, old, torch.tensor([adv]), 0.2, 0.2)
        assert torch.allclose(loss, torch.tensor([expected]), atol=1e-6)
        assert was_clipped.tolist() == [clipped]
        assert kl is None


def test_clip_higher_is_asymmetric():
    logp = torch.log(torch.tensor([[1.25]]))
    loss, clipped, _ = clipped_surrogate_loss(logp, torch.zeros(1, 1), torch.tensor([1.0]), 0.2, 0.28)
    assert torch.allclose(loss, torch.tensor([[-1.25]])) and not clipped.any()  # 1.25 < 1 + 0.28: not clipped


def test_k3_kl_value_and_sign():
    logp, ref = torch.zeros(1, 2), torch.log(torch.tensor([[0.5, 2.0]]))
    loss, _, kl = clipped_surrogate_loss(logp, logp, torch.tensor([0.0]), 0.2, 0.2, ref, kl_coef=0.1)
    expected = torch.tensor([[0.5 - math.log(0.5) - 1, 2.0 - math.log(2.0) - 1]])
    assert torch.allclose(kl, expected, atol=1e-6) and (kl >= 0).all()
    assert torch.allclose(loss, 0.1 * expected, atol=1e-6)


@pytest.mark.parametrize("norm, expected", [
    ("token", [0.2, 0.2]),  # 5 completion tokens in the batch
    ("sequence", [1 / 4, 1 / 6]),  # per-sequence mean (lengths 2 and 3), then mean over 2 sequences
    ("constant", [1 / 20, 1 / 20]),  # 2 sequences x max_new_tokens 10
])
def test_token_weights(norm, expected):
    assert torch.allclose(token_weights(torch.tensor([2, 3]), norm, 10), torch.tensor(expected))


def test_normalised_loss_by_hand():
    token_loss = torch.tensor([[1.0, 3.0, 0.0], [2.0, 2.0, 5.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    lengths = torch.tensor([2, 3])
    total = lambda norm: (token_loss * mask * token_weights(lengths, norm, 4)[:, None]).sum().item()
    assert total("token") == pytest.approx((1 + 3 + 2 + 2 + 5) / 5)
    assert total("sequence") == pytest.approx(((1 + 3) / 2 + (2 + 2 + 5) / 3) / 2)
    assert total("constant") == pytest.approx((1 + 3 + 2 + 2 + 5) / 8)


def test_ppo_clip_policy_loss_is_the_clipped_surrogate():
    logp, old, adv = torch.log(torch.tensor([1.5, 0.5, 1.1])), torch.zeros(3), torch.tensor([1.0, -1.0, 2.0])
    loss, clipped = policy_loss("ppo-clip", logp, old, adv, 0.2, 0.2)
    expected, was_clipped, _ = clipped_surrogate_loss(logp, old, adv, 0.2, 0.2)
    assert torch.equal(loss, expected) and torch.equal(clipped, was_clipped)


def test_cispo_keeps_every_tokens_gradient_weighted_by_the_clipped_detached_ratio():
    logp = torch.log(torch.tensor([1.5, 0.5, 1.1])).requires_grad_()
    adv = torch.tensor([1.0, -1.0, 2.0])
    loss, clipped = policy_loss("cispo", logp, torch.zeros(3), adv, 0.2, 0.2)
    # ratios 1.5, 0.5, 1.1 -> weights 1.2, 0.8, 1.1; loss = -w A log p
    assert torch.allclose(loss, torch.tensor([-1.2 * math.log(1.5), 0.8 * math.log(0.5), -2.2 * math.log(1.1)]))
    assert clipped.tolist() == [True, True, False]
    loss.sum().backward()
    assert torch.allclose(logp.grad, torch.tensor([-1.2, 0.8, -2.2]))  # -w A: no token loses its gradient


def test_gspo_clips_the_length_normalised_sequence_ratio():
    old = torch.zeros(3)
    logp = torch.tensor([0.1, 0.3, -0.2], requires_grad=True)  # sequence 0: tokens 0-1, sequence 1: token 2
    adv = torch.tensor([1.0, 1.0, -1.0])
    loss, clipped = policy_loss("gspo", logp, old, adv, 0.2, 0.2, sequence=torch.tensor([0, 0, 1]))
    s0, s1 = math.exp(0.2), math.exp(-0.2)  # exp of each sequence's mean log-ratio: 1.2214 (> 1.2), 0.8187
    assert torch.allclose(loss, torch.tensor([-1.2, -1.2, s1]), atol=1e-6)
    assert clipped.tolist() == [True, True, False]
    loss.sum().backward()
    # sequence 0 is clipped (no gradient); sequence 1: d(-s1 A)/d logp_2 = -A s1 / 1 token
    assert torch.allclose(logp.grad, torch.tensor([0.0, 0.0, s1]), atol=1e-6)


def test_gspo_spreads_the_sequence_gradient_evenly_over_its_tokens():
    logp = torch.tensor([0.05, -0.05], requires_grad=True)
    loss, _ = policy_loss("gspo", logp, torch.zeros(2), torch.tensor([2.0, 2.0]), 0.2, 0.2,
                          sequence=torch.tensor([0, 0]))
    loss.sum().backward()  # s = exp(0) = 1; each token's loss -s A; d/d logp_t of 2 tokens x (-s A) = -A s / 2 x 2
    assert torch.allclose(logp.grad, torch.tensor([-2.0, -2.0]))


def test_mismatch_weights_truncate_or_mask_past_the_cap():
    trainer, sampler = torch.zeros(3), torch.tensor([0.0, -1.0, 1.0])  # ratios 1, e, 1/e
    assert torch.allclose(mismatch_weights(trainer, sampler, "tis", 2.0), torch.tensor([1.0, 2.0, math.exp(-1)]))
    assert torch.allclose(mismatch_weights(trainer, sampler, "mis", 2.0), torch.tensor([1.0, 0.0, math.exp(-1)]))
    assert not mismatch_weights(trainer.requires_grad_(), sampler, "tis", 2.0).requires_grad
