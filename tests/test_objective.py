"""The GRPO objective against hand-computed values: advantages, clipping, k3 KL, loss normalisations."""

import math

import pytest
import torch

from r1lab.objective import clipped_surrogate_loss, group_advantages, token_weights, uniform_groups


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
