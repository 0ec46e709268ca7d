"""AdamW, its learning-rate schedules, the step, and the stop when an update left the weights non-finite."""

from __future__ import annotations

import itertools
import math

import torch

from r1lab.model.layers import is_dtensor
from r1lab.model.lora import LoRASpec, lora_target_names
from r1lab.train.backward_step import BackwardStep
from r1lab.train.distributed import World


class TrainingDiverged(ValueError):
    """An update left the weights non-finite (a ValueError, so the CLI prints it)."""


def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float, beta2: float) -> torch.optim.Optimizer:
    """AdamW over the trained parameters; beta2: 0.95 for supervised steps, 0.99 to average RL's noisy ones."""
    # fused: foreach builds temporaries the size of all the weights and is several times slower on a CPU
    trained = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(trained, lr=lr, betas=(0.9, beta2), weight_decay=weight_decay, fused=True)


def lora_spec(cfg) -> LoRASpec | None:
    """The LoRA adapters cfg asks for, or None for full fine-tuning."""
    if not cfg.lora_rank:
        return None
    if getattr(cfg, "shard", False):
        raise ValueError("lora_rank with shard: LoRA's adapters are small, train them unsharded (leave shard off)")
    return LoRASpec(cfg.lora_rank, cfg.lora_alpha, lora_target_names(cfg.lora_targets))


def cosine_lr(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warmup, then cosine decay to a tenth of the peak (pretraining and SFT)."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def constant_lr(step: int, peak: float, warmup: int) -> float:
    """Linear warmup, then constant (RL: the policy keeps learning from fresh rollouts to the last step)."""
    return peak * min(1.0, (step + 1) / warmup) if warmup else peak


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def optimizer_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, max_grad_norm: float,
                   finite_loss: bool = True, in_backward: BackwardStep | None = None) -> dict:
    """Clip and apply the gradients, or drop the step if loss or gradient is not finite (grad_norm NaN)."""
    if in_backward is not None:
        return in_backward.finish(finite_loss)
    grad_norm = None
    if finite_loss and max_grad_norm:
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
    elif finite_loss:
        grad_norm = torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None])
    if grad_norm is None or not torch.isfinite(grad_norm):
        optimizer.zero_grad(set_to_none=True)
        return {"grad_norm": float("nan"), "skipped_nonfinite": 1}
    optimizer.step()
    return {"grad_norm": grad_norm.item(), "skipped_nonfinite": 0}


def weights_finite(model: torch.nn.Module) -> bool:
    """Whether every floating-point parameter and buffer (this rank's part) is finite, in one host round trip."""
    tensors = [t.to_local() if is_dtensor(t) else t
               for t in itertools.chain(model.parameters(), model.buffers()) if t.is_floating_point() and t.numel()]
    if not tensors:
        return True
    largest = torch.stack([torch.linalg.vector_norm(t, ord=math.inf, dtype=torch.float32).to(tensors[0].device)
                           for t in tensors])
    return bool(torch.isfinite(largest).all())


def stop_if_diverged(model: torch.nn.Module, optimizer: torch.optim.Optimizer, step: int, name: str,
                     world: World = World()) -> None:
    """TrainingDiverged when step's (finite) update left a weight non-finite: with AdamW, lr is too large."""
    if world.all(weights_finite(model)):
        return
    group = optimizer.param_groups[0]
    raise TrainingDiverged(
        f"{name} step {step}: the weights are no longer finite after the optimizer's update (lr {group['lr']:g}, "
        f"weight_decay {group['weight_decay']:g}): the learning rate is likely too large; the run stops without "
        f"saving a model (checkpoints of earlier steps are kept): lower lr")
