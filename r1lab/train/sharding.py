"""FSDP2 (`--shard`): parameters, gradients and optimizer state split across a torchrun job's ranks."""

from __future__ import annotations

import sys
import warnings

import torch
from torch import nn

from r1lab.model.layers import is_dtensor
from r1lab.train.distributed import World

# Below this many parameters (16 MB of weights, gradients and AdamW state in float32) sharding saves less memory
# than its all-gather buffers and communication cost: such a model is refused.
MIN_SHARD_PARAMETERS = 1_000_000


def shard_model(model: nn.Module, world: World) -> nn.Module:
    """Shard model in place (FSDP2) and return it; refuse a sharding that cannot or need not happen."""
    if not world.distributed:
        raise ValueError("shard: FSDP splits a model across the ranks of a torchrun job, and this is one process; "
                         "launch with torchrun --nproc-per-node N (N >= 2), or leave shard off")
    n = sum(p.numel() for p in model.parameters())
    if n < MIN_SHARD_PARAMETERS:
        raise ValueError(f"shard: the model has {n:,} parameters, under {MIN_SHARD_PARAMETERS:,}: sharding it would "
                         f"save less memory than it costs; train it unsharded (leave shard off)")
    if getattr(model.config, "moe", None) is not None:
        raise ValueError("shard: MoE models are not sharded yet (an expert no token reached on one rank has no "
                         "gradient there, which FSDP's reduce-scatter cannot match); train it unsharded")
    from torch.distributed.fsdp import FSDPModule, fully_shard, register_fsdp_forward_method

    for layer in model.model.layers:
        # the layer's projections as one unit, not the attention module: FSDP would pass its KV cache (written in
        # place) through its own autograd function
        fully_shard([m for m in layer.self_attn.children() if isinstance(m, nn.Linear)])
        fully_shard(layer.mlp)
    fully_shard(model)
    # training calls these, not forward: they are where the root's parameters must be gathered
    for method in ("hidden_states", "completion_hidden_states"):
        register_fsdp_forward_method(model, method)
    # FSDP warns that an in-place op on a unit's output (a view: the projections' x @ W.T for few rows, a reshape)
    # would skip its backward hook; the model's layers take those outputs out of place only
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)  # a sum, not FSDP's default mean
            module.set_force_sum_reduction_for_comms(True)  # gloo has no pre-multiplied sum
    return model


def is_sharded(model: nn.Module) -> bool:
    fsdp = sys.modules.get("torch.distributed.fsdp")  # no module is sharded before FSDP is loaded
    return fsdp is not None and isinstance(model, fsdp.FSDPModule)


def distributed_checkpoint():
    """torch.distributed.checkpoint and its state_dict module, imported lazily (~0.7 s at a command's start)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import state_dict

    return dcp, state_dict


def full_state_dict(model: nn.Module) -> dict:
    """The model's full weights; a sharded model's gathered onto rank 0's CPU ({} elsewhere; all ranks call)."""
    if not is_sharded(model):
        return model.state_dict()
    state_dict = distributed_checkpoint()[1]
    return state_dict.get_model_state_dict(model, options=state_dict.StateDictOptions(full_state_dict=True,
                                                                                     cpu_offload=True))


def load_full_state_dict(model: nn.Module, state: dict) -> None:
    if is_sharded(model):
        state_dict = distributed_checkpoint()[1]
        state_dict.set_model_state_dict(model, state, options=state_dict.StateDictOptions(full_state_dict=True))
    else:
        model.load_state_dict(state)


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """A parameter's whole value, gathered when it is a shard (all ranks call)."""
    return t.full_tensor() if is_dtensor(t) else t


def held_bytes(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Bytes this rank holds of the parameters, gradients and optimizer state."""
    size = lambda ts: sum((t.to_local() if is_dtensor(t) else t).nbytes for t in ts)  # noqa: E731
    params = list(model.parameters())
    state = [v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
    return {"weights": size(params), "gradients": size(p.grad for p in params if p.grad is not None),
            "optimizer": size(state)}

