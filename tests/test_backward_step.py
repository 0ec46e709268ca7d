"""The optimizer step in the backward pass (optimizer_in_backward): the same update as stepping after the backward,
each layer's gradient freed before the backward reaches the layer below, and bad input refused."""

import contextlib

import pytest
import torch
from test_grpo import small_config, weights

import r1lab.model.layers as model_module
import r1lab.train.grpo as grpo
from r1lab.config import GRPOConfig
from r1lab.train.backward_step import BackwardStep
from r1lab.train.optimizer import optimizer_step


def rollout_batches(base, cfg):
    model, tok = grpo.load_policy(str(base), torch.device("cpu"))
    problems = grpo.PromptStream(grpo.get_task("arithmetic"), cfg).batch(0)[:2]
    rollouts = grpo.sample_rollouts(grpo.Engine(model, tok), problems, cfg, seed=0)
    adv = torch.linspace(-1, 1, len(rollouts.texts))
    return grpo.make_micro_batches(rollouts, adv, torch.ones(len(adv), dtype=torch.bool), cfg, tok.pad_id, "cpu")


@pytest.mark.parametrize("micro_batches", [1, 2])
@pytest.mark.parametrize("in_place_min", [model_module.IN_PLACE_GRAD_MIN, 0])
def test_stepping_in_the_backward_gives_the_update_of_stepping_after_it(tiny_base, tmp_path, monkeypatch, in_place_min,
                                                                        micro_batches):
    # One micro-batch (the tied LM head's product deferred to the end of the backward) or two (the first only
    # accumulates); two optimizer steps (the second uses the first's moments), weight decay on; through autograd's
    # gradients and through the projections' in-place ones.
    monkeypatch.setattr(model_module, "IN_PLACE_GRAD_MIN", in_place_min)
    cfg = small_config(tiny_base, tmp_path, micro_batch_size=8 // micro_batches, max_grad_norm=0)
    batches = rollout_batches(tiny_base, cfg)
    assert len(batches) == micro_batches
    results = {}
    for in_backward in (False, True):
        model, _ = grpo.load_policy(str(tiny_base), torch.device("cpu"))
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1, fused=True)
        cfg.optimizer_in_backward = in_backward
        stats = [grpo.update_policy(model, None, optimizer, batches, cfg) for _ in range(2)]
        assert all(p.grad is None for p in model.parameters())
        results[in_backward] = stats, model.state_dict(), optimizer.state_dict()["state"]
    (stats_after, weights_after, state_after), (stats_in, weights_in, state_in) = results[False], results[True]
    for name, w in weights_after.items():
        torch.testing.assert_close(weights_in[name], w, rtol=0, atol=1e-6, msg=name)
    for i, state in state_after.items():
        torch.testing.assert_close(state_in[i]["exp_avg_sq"], state["exp_avg_sq"], rtol=1e-5, atol=1e-12)
        assert float(state_in[i]["step"]) == float(state["step"]) == 2
    for a, b in zip(stats_after, stats_in):
        assert b["skipped_nonfinite"] == a["skipped_nonfinite"] == 0
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-5)


def test_each_layer_is_stepped_before_the_backward_reaches_the_layer_below(tiny_base, tmp_path, monkeypatch):
    # The point of the mode: a layer's gradient is complete (both the shared prompt's pass and the completions')
    # and freed before any gradient of a lower layer exists. Two sequential passes (the prompt through every layer,
    # then the completions) break it. The projections write their gradients in place, as at real shapes: autograd's
    # own path would hold a partial gradient in its buffers, where .grad does not show it.
    monkeypatch.setattr(model_module, "IN_PLACE_GRAD_MIN", 0)
    cfg = small_config(tiny_base, tmp_path, max_grad_norm=0, optimizer_in_backward=True)
    batches = rollout_batches(tiny_base, cfg)
    model, _ = grpo.load_policy(str(tiny_base), torch.device("cpu"))
    layer_of = {p: i for i, layer in enumerate(model.model.layers) for p in layer.parameters()}
    assert len(model.model.layers) >= 2 and model.config.tie_word_embeddings
    seen = []
    step = BackwardStep._step

    def recording_step(self, param):
        if param in layer_of:
            lower = [i for p, i in layer_of.items() if i < layer_of[param] and p.grad is not None]
            seen.append((layer_of[param], lower))
            # the tied head's (V, D) gradient waits for the end of the backward, not beside the activations
            assert model.lm_head.weight.grad is None
        step(self, param)

    monkeypatch.setattr(BackwardStep, "_step", recording_step)
    grpo.update_policy(model, None, torch.optim.AdamW(model.parameters(), lr=1e-3), batches, cfg)
    assert {layer for layer, _ in seen} == set(range(len(model.model.layers)))
    assert all(not lower for _, lower in seen), seen
    assert [layer for layer, _ in seen] == sorted((layer for layer, _ in seen), reverse=True)


def test_a_nonfinite_gradient_drops_that_parameters_update_and_is_counted():
    good, bad = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.AdamW([good, bad], lr=0.1)
    with BackwardStep(optimizer) as in_backward:
        in_backward.arm()
        (good.sum() + (bad * torch.tensor([1.0, float("inf"), 1.0])).sum()).backward()
        assert good.grad is None and bad.grad is None  # both freed in the backward
        stats = in_backward.finish(True)
    assert stats["skipped_nonfinite"] == 1
    assert torch.equal(bad.detach(), torch.ones(3)) and not torch.equal(good.detach(), torch.ones(3))


def test_unarmed_backward_only_accumulates_and_a_nonfinite_loss_updates_nothing():
    w = torch.nn.Parameter(torch.ones(2))
    optimizer = torch.optim.AdamW([w], lr=0.1)
    with BackwardStep(optimizer) as in_backward:
        (w * 2).sum().backward()  # not armed: an earlier micro-batch
        assert torch.equal(w.grad, torch.full((2,), 2.0)) and torch.equal(w.detach(), torch.ones(2))
        in_backward.arm()
        assert in_backward.finish(False) == {"grad_norm": pytest.approx(float("nan"), nan_ok=True),
                                             "skipped_nonfinite": 1}
        assert w.grad is None and torch.equal(w.detach(), torch.ones(2))
    (w * 2).sum().backward()  # hooks removed on leaving the block
    assert w.grad is not None and torch.equal(w.detach(), torch.ones(2))


def test_zero_max_grad_norm_steps_without_clipping():
    w = torch.nn.Parameter(torch.zeros(2))
    optimizer = torch.optim.SGD([w], lr=1.0)
    w.grad = torch.tensor([30.0, 40.0])
    stats = optimizer_step(w_module(w), optimizer, 0.0)
    assert stats == {"grad_norm": pytest.approx(50.0), "skipped_nonfinite": 0}
    assert torch.equal(w.detach(), torch.tensor([-30.0, -40.0]))


def w_module(w):
    module = torch.nn.Module()
    module.w = w
    return module


@pytest.mark.parametrize("settings, problem", [
    ({"optimizer_in_backward": True}, "optimizer_in_backward cannot clip to max_grad_norm 1"),
    ({"optimizer_in_backward": True, "max_grad_norm": 0, "shard": True}, "optimizer_in_backward with shard"),
    ({"max_grad_norm": -1}, "max_grad_norm"),
])
def test_settings_it_cannot_honour_are_refused(settings, problem):
    with pytest.raises(ValueError, match=problem):
        GRPOConfig(**settings).check()


def test_it_is_refused_under_torchrun(tmp_path):
    cfg = small_config(tmp_path, tmp_path, max_grad_norm=0, optimizer_in_backward=True)
    world = grpo.World(rank=0, size=2)
    with pytest.raises(ValueError, match="optimizer_in_backward runs in one process"):
        grpo.check_world(cfg, world)


def test_a_run_with_the_step_in_the_backward_trains_checkpoints_and_resumes(tiny_base, tmp_path):
    # end to end through `r1lab grpo`'s train(): the optimizer's state is the ordinary AdamW's, so a checkpoint
    # written in this mode resumes into the same weights as the uninterrupted run
    settings = dict(max_grad_norm=0, optimizer_in_backward=True, save_every=2, steps=3)
    whole = grpo.train(small_config(tiny_base, tmp_path / "whole", **settings), log=lambda *_: None)
    grpo.train(small_config(tiny_base, tmp_path / "cut", **{**settings, "steps": 2}), log=lambda *_: None)
    resumed = grpo.train(small_config(tiny_base, tmp_path / "cut", **settings, resume=True), log=lambda *_: None)
    before, after, again = weights(tiny_base), weights(whole), weights(resumed)
    assert any(not torch.equal(before[k], after[k]) for k in before)
    for name, w in after.items():
        torch.testing.assert_close(again[name], w, rtol=0, atol=1e-6, msg=name)


def test_a_nonfinite_loss_after_a_stepped_update_still_updates_nothing():
    w = torch.nn.Parameter(torch.ones(2))
    optimizer = torch.optim.AdamW([w], lr=0.1)
    with BackwardStep(optimizer) as in_backward:
        in_backward.arm()
        w.sum().backward()
        assert in_backward.finish(True)["skipped_nonfinite"] == 0
        stepped = w.detach().clone()
        assert in_backward.finish(False)["skipped_nonfinite"] == 1  # the next update: its loss was not finite
        assert torch.equal(w.detach(), stepped)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_sft_steps_in_the_backward_as_after_it(tiny_base, checkpointing):
    # SFT's loop (pretraining's too): two micro-batches, two steps, with and without activation checkpointing
    # (whose recomputation runs inside the backward pass, beside the hooks)
    from r1lab.train.supervised import lm_step

    docs = [[1 + (i * 7 + j) % 50 for j in range(5 + i)] for i in range(6)]
    results = {}
    for in_backward in (False, True):
        model, _ = grpo.load_policy(str(tiny_base), torch.device("cpu"))
        model.set_activation_checkpointing(checkpointing)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1, fused=True)
        with BackwardStep(optimizer) if in_backward else contextlib.nullcontext() as stepper:
            stats = [lm_step(model, optimizer, docs, None, 0, micro_batch_size=4, max_grad_norm=0,
                             in_backward=stepper) for _ in range(2)]
        assert all(p.grad is None for p in model.parameters()) or not in_backward
        results[in_backward] = stats, model.state_dict()
    (stats_after, weights_after), (stats_in, weights_in) = results[False], results[True]
    for name, w in weights_after.items():
        torch.testing.assert_close(weights_in[name], w, rtol=0, atol=1e-6, msg=name)
    assert [s["loss"] for s in stats_in] == pytest.approx([s["loss"] for s in stats_after], rel=1e-6)
    assert [s["grad_norm"] for s in stats_in] == pytest.approx([s["grad_norm"] for s in stats_after], rel=1e-5)


def test_sft_refuses_clipping_with_the_step_in_the_backward():
    from r1lab.config import SFTConfig

    with pytest.raises(ValueError, match="optimizer_in_backward cannot clip to max_grad_norm 1"):
        SFTConfig(data="x.jsonl", optimizer_in_backward=True).check()
