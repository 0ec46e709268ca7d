"""Gradient memory kept from one optimizer step to the next, for the large weights of a CPU run.

Freeing every gradient after a step (zero_grad(set_to_none=True)) hands its memory back to the OS: on a CPU a large
tensor is a mapping of its own, and the next backward's first write into a fresh gradient faults every page in
again and has the kernel zero it first. At the Qwen2.5-0.5B shape that is 2 GB of gradients per step; on 2 CPU
cores the products that wrote a fresh (out, in) gradient ran at 91-123 GFLOP/s, the same products into memory
already mapped at 209-213 (bench/README.md, "The CPU mode").

release_gradients() therefore sets every gradient to None, as set_to_none does (autograd, the optimizer and
checkpoints see no difference), but keeps large CPU gradients aside as their parameters' spares; the in-place
writers (r1lab/model/transformer.py's _InPlaceGradLinear, r1lab/train/logprobs.py's LM head) take them back for their first write of
the next backward.

A spare held through the next forward pass sits beside that pass's activations, where a freed gradient would only
come back as the activations go: keeping them all raised the peak by 0.9 GB at the Qwen2.5-0.5B workload. So only
as many are kept as fit under the step's own peak: the resident size after the backward passes (every gradient
alive, the activations gone) less the highest one seen before them (the activations at their highest, with the LM
head's passing peak; r1lab/cpu/memory.py samples it), the spares kept through those passes counted back in; backward()
notes both. They are kept in the order the backward writes them, so that each is soon a gradient again.
"""

from __future__ import annotations

import dataclasses
import functools
import weakref
from collections.abc import Iterable

import torch
from torch.distributed.tensor import DTensor

from r1lab.cpu import allocator as cpu_allocator
from r1lab.cpu.memory import resident_bytes, resident_peak
from r1lab.model.layers import IN_PLACE_GRAD_MIN

SAMPLER_CHANNEL = "gradient spares"  # its own reading of r1lab/cpu/memory.py's resident-size sampler

# id(parameter) -> (a weak reference to it, its last gradient's memory); by identity, as tensors compare by value.
# An entry goes with its parameter.
_spares: dict[int, tuple[weakref.ref, torch.Tensor]] = {}


@dataclasses.dataclass
class _Budget:
    forward_high: int = 0  # the highest resident size before a backward pass since the last release
    after_backward: int = 0  # the resident size after the latest backward pass
    kept: int = 0  # bytes of the spares kept at the last release (held through those passes)
    first_writes: dict = dataclasses.field(default_factory=dict)  # id(parameter) -> rank of its first write


_budget = _Budget()


def backward(loss: torch.Tensor) -> None:
    """loss.backward(), noting the highest resident size since the last backward or release (the forward pass:
    the activations at their highest, and its passing peaks, the LM head's) and the size after it. On a GPU, only
    the backward: spares are for CPU memory."""
    if loss.device.type != "cpu":
        loss.backward()
        return
    _budget.forward_high = max(_budget.forward_high, _peak_since_last_call())
    loss.backward()
    _budget.after_backward = resident_bytes() or 0
    _peak_since_last_call()  # the backward's own peak is not a forward's


def _peak_since_last_call() -> int:
    peak = resident_peak(SAMPLER_CHANNEL)
    return (resident_bytes() or 0) if peak is None else int(peak)


def spare_budget() -> int:
    """Bytes of spares that fit under this step's peak (see above); 0 before any backward pass was noted. Taken
    before the optimizer step: AdamW's state, made at the first step, is not room for spares."""
    if not _budget.forward_high or not _budget.after_backward or cpu_allocator.installed():
        return 0  # r1lab's CPU allocator already hands a freed gradient's block to the next one of its size
    return max(0, _budget.after_backward - (_budget.forward_high - _budget.kept))


def release_gradients(params: Iterable[torch.Tensor] | torch.optim.Optimizer, budget: int | None = None) -> None:
    """Set each parameter's gradient to None, keeping large CPU ones as spares, in the order the last backward
    first wrote them, up to budget bytes (default: spare_budget())."""
    if isinstance(params, torch.optim.Optimizer):
        params = [p for group in params.param_groups for p in group["params"]]
    # in the order the last backward wrote them: a spare taken early in the next backward is soon no longer a spare
    # beside activations (a later one sits there through most of it), and the peak stays where it was
    order = _budget.first_writes
    released = sorted((p for p in params if p.grad is not None), key=lambda p: order.get(id(p), len(order)))
    if not released:  # nothing to release: the budget's record stands for the step that had gradients
        _peak_since_last_call()  # and the next forward's window starts here (the first step's too)
        return
    budget = spare_budget() if budget is None else budget
    kept = 0
    for p in released:
        grad, p.grad = p.grad, None
        _spares.pop(id(p), None)  # one left from an earlier step (this one made its gradient afresh)
        size = grad.numel() * grad.element_size()
        if _worth_keeping(p, grad) and kept + size <= budget:
            _spares[id(p)] = (weakref.ref(p, functools.partial(_forget, id(p))), grad.detach())
            kept += size
    _budget.forward_high, _budget.after_backward, _budget.kept, _budget.first_writes = 0, 0, kept, {}
    _peak_since_last_call()  # the next forward's window starts here


def _forget(key: int, _dead: weakref.ref) -> None:
    _spares.pop(key, None)


def _worth_keeping(param: torch.Tensor, grad: torch.Tensor) -> bool:
    # a CUDA allocator keeps freed blocks itself; a sparse, sharded (FSDP's DTensor: r1lab does not write those in
    # place) or mismatched gradient is nothing to write into
    return (grad.device.type == "cpu" and grad.layout == torch.strided and not isinstance(grad, DTensor) and grad.numel() >= IN_PLACE_GRAD_MIN
            and grad.shape == param.shape and grad.dtype == param.dtype and grad.is_contiguous())


def take_spare(param: torch.Tensor) -> torch.Tensor | None:
    """The memory of param's last gradient (its contents are stale), or None: write into it, or allocate. Called
    by the in-place writers at their first write of each backward (whose order release_gradients follows)."""
    _budget.first_writes.setdefault(id(param), len(_budget.first_writes))
    ref, spare = _spares.pop(id(param), (None, None))
    if ref is None or ref() is not param or spare.shape != param.shape or spare.dtype != param.dtype \
            or spare.device != param.device:
        return None
    return spare


def zeroed_gradient(param: torch.Tensor) -> torch.Tensor:
    """A zero gradient for param, in its spare's memory when it has one."""
    spare = take_spare(param)
    return torch.zeros_like(param) if spare is None else spare.zero_()

