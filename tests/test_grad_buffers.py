"""Gradient memory kept between steps (r1lab/cpu/grad_buffers.py): the next backward writes into the last step's
gradient memory, and the gradients, the weights and the optimizer's steps are the same as with freed gradients."""

import gc

import pytest
import torch

import r1lab.cpu.grad_buffers as grad_buffers
import r1lab.model.layers as model_module
from r1lab.cpu.grad_buffers import (
    backward,
    release_gradients,
    spare_budget,
    take_spare,
    zeroed_gradient,
)
from r1lab.model.architecture import ModelConfig
from r1lab.model.layers import Linear
from r1lab.model.transformer import CausalLM
from r1lab.train.logprobs import token_logprobs
from r1lab.train.optimizer import make_optimizer, optimizer_step


@pytest.fixture
def every_weight_in_place(monkeypatch):
    """Tiny weights take the in-place path and keep spares, as a 0.5B model's do."""
    monkeypatch.setattr(model_module, "IN_PLACE_GRAD_MIN", 0)
    monkeypatch.setattr(grad_buffers, "IN_PLACE_GRAD_MIN", 0)


def _tiny(tied: bool = True) -> CausalLM:
    torch.manual_seed(0)
    return CausalLM(ModelConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied))


def test_release_keeps_large_cpu_gradients_as_spares_and_frees_the_rest():
    big, small = torch.nn.Parameter(torch.zeros(1 << 20)), torch.nn.Parameter(torch.zeros(8))
    for p in (big, small):
        p.grad = torch.ones_like(p)
    kept = big.grad
    release_gradients([big, small], budget=1 << 40)
    assert big.grad is None and small.grad is None  # as zero_grad(set_to_none=True)
    assert take_spare(small) is None
    spare = take_spare(big)
    assert spare is not None and spare.data_ptr() == kept.data_ptr()
    assert take_spare(big) is None  # taken once


def test_a_spare_goes_with_its_parameter():
    p = torch.nn.Parameter(torch.zeros(1 << 20))
    p.grad = torch.ones_like(p)
    release_gradients([p], budget=1 << 40)
    key = id(p)
    assert key in grad_buffers._spares
    del p
    gc.collect()
    assert key not in grad_buffers._spares


def test_a_spare_that_no_longer_fits_its_parameter_is_not_used():
    p = torch.nn.Parameter(torch.zeros(1 << 20))
    p.grad = torch.ones_like(p)
    release_gradients([p], budget=1 << 40)
    p.data = torch.zeros(1 << 21)  # the weight was replaced by one of another size
    assert take_spare(p) is None


def test_zeroed_gradient_is_zero_in_the_spares_memory():
    p = torch.nn.Parameter(torch.zeros(1 << 20))
    p.grad = torch.full_like(p, 3.0)
    kept = p.grad.data_ptr()
    release_gradients([p], budget=1 << 40)
    z = zeroed_gradient(p)
    assert z.data_ptr() == kept and not z.any()
    assert not zeroed_gradient(p).any()  # no spare left: a fresh zero tensor


def _head_loss(model, ids):
    hidden = model.hidden_states(ids)[:, :-1].reshape(-1, model.config.hidden_size)
    logp, _ = token_logprobs(model, hidden, ids[:, 1:].reshape(-1), 1.0)
    return -(logp * torch.linspace(-1, 1, len(logp))).sum()


@pytest.mark.parametrize("tied", [True, False])
def test_steps_through_spares_equal_steps_through_fresh_gradients(tied, every_weight_in_place, monkeypatch):
    """Three AdamW steps of two micro-batches each: the projections' in-place gradients and the tied LM head's
    write into the last step's memory (checked by address), and every weight ends where freed gradients take it."""
    ids = torch.randint(0, 96, (3, 12), generator=torch.Generator().manual_seed(1))
    results = []
    for keep in (False, True):
        model = _tiny(tied)
        optimizer = make_optimizer(model, 1e-2, 0.0, 0.99)
        gate_up = model.model.layers[0].mlp.gate_up_proj.weight
        addresses = []
        for _ in range(3):
            for mb in (ids[:2], ids[2:]):
                _head_loss(model, mb).backward()
            addresses.append((gate_up.grad.data_ptr(), model.lm_head.weight.grad.data_ptr()))
            optimizer_step(model, optimizer, 1.0)
            if keep:
                release_gradients(optimizer, budget=1 << 40)
            else:
                optimizer.zero_grad(set_to_none=True)
            assert all(p.grad is None for p in model.parameters())
        if keep:  # the second and third steps wrote where the first step's gradients were
            assert addresses[1] == addresses[0] and addresses[2] == addresses[0]
        results.append(model.state_dict())
    for name, value in results[0].items():
        torch.testing.assert_close(results[1][name], value, rtol=0, atol=0, msg=name)


def test_projection_gradient_over_a_stale_spare_is_written_not_added(every_weight_in_place):
    """The first backward after a release overwrites the spare's stale contents."""
    layer = Linear(6, 5, bias=False)
    x = torch.randn(4, 6)
    layer(x).sum().backward()
    expected = layer.weight.grad.clone()
    layer.weight.grad.fill_(1e6)  # stale contents
    release_gradients([layer.weight], budget=1 << 40)
    layer(x).sum().backward()
    torch.testing.assert_close(layer.weight.grad, expected)


def _params_with_gradients(*sizes):
    params = [torch.nn.Parameter(torch.zeros(n)) for n in sizes]
    for p in params:
        p.grad = torch.ones_like(p)
    return params


def test_spares_are_kept_in_the_order_the_backward_wrote_them_within_the_budget(monkeypatch):
    """The first gradients the backward wrote are kept first: each is soon a gradient again in the next one."""
    monkeypatch.setattr(grad_buffers, "_budget", grad_buffers._Budget())
    mb = 1 << 20
    params = _params_with_gradients(mb, 4 * mb, 2 * mb, mb)  # 4, 16, 8 and 4 MB of gradients
    for p in (params[2], params[0], params[1]):  # the writers' first writes, in this order; params[3] none
        assert take_spare(p) is None
    release_gradients(params, budget=13 * mb)  # room for the first two written: 8 + 4 MB
    assert [take_spare(p) is not None for p in params] == [True, False, True, False]


class _PassThatFrees:
    """A backward pass whose resident size goes from `before` to `after` (the activations go, gradients come)."""

    device = torch.device("cpu")

    def __init__(self, resident: dict, before: int, after: int):
        self.resident, self.after = resident, after
        resident["now"] = before

    def backward(self):
        self.resident["now"] = self.after


def test_the_budget_is_what_fits_under_the_steps_own_peak(monkeypatch):
    """Spares kept through a forward pass sit beside its activations: only the resident size after the backward
    passes (every gradient alive) less the highest one before them, with the spares kept through them counted
    back, fits; memory that comes after the backward (AdamW's state at the first step) is not room for spares."""
    resident = {"now": 0}
    monkeypatch.setattr(grad_buffers, "resident_bytes", lambda: resident["now"])
    monkeypatch.setattr(grad_buffers, "resident_peak", lambda channel: None)  # no sampler: the size at the call
    monkeypatch.setattr(grad_buffers, "_budget", grad_buffers._Budget())
    mb = 1 << 20
    params = _params_with_gradients(4 * mb, 4 * mb, 4 * mb)  # 16 MB of gradient each
    assert spare_budget() == 0  # no backward seen: nothing is kept
    backward(_PassThatFrees(resident, before=100 * mb, after=120 * mb))  # two micro-batches; the first's high
    backward(_PassThatFrees(resident, before=130 * mb, after=135 * mb))  # point is lower than the second's
    resident["now"] = 500 * mb  # the optimizer's state, made at its first step
    assert spare_budget() == 5 * mb
    release_gradients(params)  # room for none of them
    assert grad_buffers._budget.kept == 0 and all(take_spare(p) is None for p in params)
    release_gradients(params)  # nothing to release: the record stands
    for p in params:
        p.grad = torch.ones_like(p)
    backward(_PassThatFrees(resident, before=100 * mb, after=135 * mb))
    release_gradients(params)  # 35 MB of room: two of the three
    assert grad_buffers._budget.kept == 32 * mb
    for p in params:
        p.grad = torch.ones_like(p)
    backward(_PassThatFrees(resident, before=132 * mb, after=135 * mb))  # the high point now holds the 32 MB
    assert spare_budget() == 35 * mb  # the same room: 135 - (132 - 32)
