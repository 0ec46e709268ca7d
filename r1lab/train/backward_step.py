"""The optimizer step inside the backward pass (docs/performance.md): each parameter updated, and its gradient freed,
once complete; a tied LM head's products wait for the embedding's backward, the last.
"""

from __future__ import annotations

import contextlib
import math

import torch

_DEFERRED = "r1lab_deferred_products"


class BackwardStep(contextlib.AbstractContextManager):
    """Steps each parameter from its post-accumulate-grad hook: arm() before the last backward, then finish()."""

    def __init__(self, optimizer: torch.optim.Optimizer):
        self.optimizer = optimizer
        self.group_of = {p: group for group in optimizer.param_groups for p in group["params"]}
        self.handles = [p.register_post_accumulate_grad_hook(self._on_gradient) for p in self.group_of]
        self.armed = False
        self._reset()

    def _reset(self) -> None:
        self.stepped: set = set()
        self.squared_norm = 0.0
        self.nonfinite = 0

    def arm(self) -> None:
        self.armed = True
        for param in self.group_of:  # a gradient kept from earlier micro-batches is there anyway: add at once
            setattr(param, _DEFERRED, [] if param.grad is None else None)

    def _on_gradient(self, param: torch.Tensor) -> None:
        if self.armed:
            _add_deferred(param)
            if param.grad is not None:
                self._step(param)

    def _step(self, param: torch.Tensor) -> None:
        """Update param alone, then free its gradient; a non-finite gradient drops this parameter's update only."""
        squared = float(torch.linalg.vector_norm(param.grad, dtype=torch.float32)) ** 2
        if math.isfinite(squared):
            self.squared_norm += squared
            groups = self.optimizer.param_groups
            kept = [group["params"] for group in groups]
            for group in groups:
                group["params"] = [param] if group is self.group_of[param] else []
            try:
                self.optimizer.step()
            finally:
                for group, params in zip(groups, kept):
                    group["params"] = params
        else:
            self.nonfinite += 1
        param.grad = None
        self.stepped.add(param)

    def finish(self, finite_loss: bool) -> dict:
        """Step the parameters no hook stepped; returns grad_norm and skipped_nonfinite. After a non-finite loss
        (before the armed backward ran) nothing was updated, and the gradients are dropped."""
        self.armed = False
        if not finite_loss:
            assert not self.stepped, "a parameter was updated in a step whose loss was not finite"
            self._disarm_deferred()
            self.optimizer.zero_grad(set_to_none=True)
            return {"grad_norm": float("nan"), "skipped_nonfinite": 1}
        for param in self.group_of:
            if param not in self.stepped:
                _add_deferred(param)
                if param.grad is not None:
                    self._step(param)
        self._disarm_deferred()
        norm = math.sqrt(self.squared_norm) if not self.nonfinite else float("nan")
        skipped = int(self.nonfinite > 0)
        self._reset()
        return {"grad_norm": norm, "skipped_nonfinite": skipped}

    def _disarm_deferred(self) -> None:
        for param in self.group_of:
            setattr(param, _DEFERRED, None)

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []
        for param in self.group_of:
            if hasattr(param, _DEFERRED):
                delattr(param, _DEFERRED)

    def __exit__(self, *exc) -> None:
        self.close()


def deferred_products(param: torch.Tensor) -> list | None:
    """The list to leave (grad_out, input) pairs of param's gradient in while armed; None: add at once."""
    return getattr(param, _DEFERRED, None)


def add_product(grad: torch.Tensor, grad_out: torch.Tensor, x: torch.Tensor) -> None:
    """grad += grad_out.T @ x, in place."""
    if grad_out.dtype == grad.dtype:
        grad.addmm_(grad_out.t(), x)
    else:
        grad += (grad_out.t() @ x).to(grad.dtype)


def _add_deferred(param: torch.Tensor) -> None:
    parts = deferred_products(param)
    if not parts:
        return
    # the products first, then the embedding lookup's (sparse) rows: the order of the sums without the deferral
    rows = param.grad
    param.grad = torch.zeros_like(param) if rows is None or rows.is_sparse else rows
    for grad_out, x in parts:
        add_product(param.grad, grad_out, x)
    if rows is not None and rows.is_sparse:
        param.grad.add_(rows)
    parts.clear()


def check_one_process(cfg, world) -> None:
    """Refuse optimizer_in_backward under torchrun."""
    if cfg.optimizer_in_backward and world.distributed:
        raise ValueError("optimizer_in_backward runs in one process: under torchrun the gradients are summed over the "
                         "ranks after the backward pass, which it would have stepped and freed already")
