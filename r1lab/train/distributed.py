"""Running under torchrun: this process's rank and the collectives r1lab needs (docs/torchrun.md). Without torchrun,
World() is a job of one and every collective is the identity.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from r1lab.model.layers import is_dtensor

GRADIENT_BUCKET_BYTES = 32 << 20  # gradients are summed in flat buckets of about this size (one collective each)


@dataclass(frozen=True)
class World:

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    device: str = "cpu"  # where collectives' tensors must live: the rank's GPU under NCCL

    def _all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """t summed over ranks, on t's device."""
        moved = t.to(self.device)
        dist.all_reduce(moved)
        return moved.to(t.device)

    @property
    def main(self) -> bool:
        """Rank 0: the one that logs and writes the run's files."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    def share(self, n: int) -> range:
        """This rank's contiguous share of n items (sizes differ by at most one)."""
        return range(n * self.rank // self.size, n * (self.rank + 1) // self.size)

    def gather(self, obj) -> list:
        if not self.distributed:
            return [obj]
        out = [None] * self.size
        dist.all_gather_object(out, obj)
        return out

    def concat(self, items: list) -> list:
        return [x for part in self.gather(items) for x in part]

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sums over ranks (in float64: counts and loss totals)."""
        if not self.distributed:
            return list(values)
        return self._all_reduce(torch.tensor(values, dtype=torch.float64)).tolist()

    def all(self, flag: bool) -> bool:
        return not self.any(not flag)

    def any(self, flag: bool) -> bool:
        """Whether flag is true on any rank (every rank must call it)."""
        return flag if not self.distributed else self.sum([float(flag)])[0] > 0

    def broadcast(self, obj):
        if not self.distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def sum_counts(self, counts: dict) -> None:
        """Sum, in place, a dict of tensors every rank holds under the same keys (MoE expert loads)."""
        if self.distributed:
            for key in sorted(counts):
                counts[key].copy_(self._all_reduce(counts[key]))

    def sum_gradients(self, params) -> None:
        """Each gradient := its sum over ranks, in buckets (not DDP: its hooks miss the hand-written LM-head backward
        and would wait forever for a rank that trains no sequence)."""
        if not self.distributed:
            return
        params = [p for p in params if p.requires_grad and not is_dtensor(p)]  # FSDP reduces its own
        # a parameter no rank used keeps no gradient (as in one process); one some rank used gets zeros elsewhere
        used = self._all_reduce(torch.tensor([p.grad is not None for p in params], dtype=torch.float32))
        params = [p for p, n in zip(params, used.tolist()) if n > 0]
        for p in params:
            p.grad = torch.zeros_like(p) if p.grad is None else p.grad.to_dense() if p.grad.is_sparse else p.grad
        for bucket in _buckets([p.grad for p in params], GRADIENT_BUCKET_BYTES):
            flat = self._all_reduce(torch.cat([g.reshape(-1) for g in bucket]))
            for g, part in zip(bucket, flat.split([g.numel() for g in bucket])):
                g.copy_(part.view_as(g))


def _buckets(tensors: list[torch.Tensor], max_bytes: int) -> list[list[torch.Tensor]]:
    """Consecutive tensors of one dtype and device, grouped up to about max_bytes each."""
    buckets, current, size = [], [], 0
    for t in tensors:
        if current and (size + t.numel() * t.element_size() > max_bytes or t.dtype != current[0].dtype
                        or t.device != current[0].device):
            buckets.append(current)
            current, size = [], 0
        current.append(t)
        size += t.numel() * t.element_size()
    return buckets + ([current] if current else [])


def join_world(device: torch.device, timeout_s: float) -> tuple[World, torch.device]:
    """Join the torchrun job; returns it and this rank's device. timeout_s bounds every collective (a dead rank)."""
    if "TORCHELASTIC_RUN_ID" not in os.environ and not ("RANK" in os.environ and "WORLD_SIZE" in os.environ):
        return World(), device
    world = World(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0)))
    if not world.distributed:
        return world, device
    if device.type == "cuda":
        device = torch.device("cuda", world.local_rank)
        torch.cuda.set_device(device)
        world = dataclasses.replace(world, device=str(device))
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                timeout=datetime.timedelta(seconds=timeout_s))
    return world, device


def leave_world() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


class Silent(contextlib.AbstractContextManager):
    """A logger or progress bar for ranks other than 0: every call does nothing."""

    def __exit__(self, *exc) -> None:
        return None

    def __getattr__(self, name):
        return lambda *args, **kwargs: None
