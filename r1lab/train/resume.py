"""What makes a run resumable: EpochOrder, resume_run, save_run_config, and save_final."""

from __future__ import annotations

import dataclasses
import functools
import random
from pathlib import Path

import torch

from r1lab.config import save_config
from r1lab.engine.sampling import step_seed
from r1lab.model.hf_format import save_model
from r1lab.model.lora import merge_lora, save_adapter
from r1lab.train.checkpoint import (RESUME_FREE_FIELDS, CheckpointError, check_config_change, checkpoint_step,
                                    find_resume_checkpoint, load_checkpoint, tensor_bytes, update_run_config,
                                    written_directory)
from r1lab.train.distributed import World
from r1lab.train.sharding import full_state_dict


class EpochOrder:
    """Endless shuffled epochs over n examples, each seeded by (seed, epoch) alone: any step's batch is direct."""

    def __init__(self, n: int, seed: int):
        if n < 1:
            raise ValueError("EpochOrder needs at least one example")
        self.n, self.seed = n, seed

    def batch(self, step: int, size: int) -> list[int]:
        """The `size` example indices of step `step` (a batch may cross an epoch boundary)."""
        return [self._epoch(p // self.n)[p % self.n] for p in range(step * size, (step + 1) * size)]

    @functools.lru_cache(maxsize=4)
    def _epoch(self, epoch: int) -> list[int]:
        return random.Random(step_seed(self.seed, epoch, "epoch")).sample(range(self.n), self.n)


def resume_run(run: Path, cfg, model: torch.nn.Module, optimizer: torch.optim.Optimizer, log,
               world: World = World(), free: frozenset = RESUME_FREE_FIELDS) -> int:
    """The steps done: the newest intact checkpoint's when cfg.resume, else 0. Settings that differ from the run's
    (`free` ones excepted) are refused unless cfg.allow_config_change. Rank 0 checks; every rank loads."""
    mode = {True: "true", False: "false"}.get(cfg.resume, cfg.resume)  # a config edited after it was made
    if mode == "false":
        return 0
    ckpt = None
    if world.main and (ckpt := find_resume_checkpoint(run, log)) is not None:
        check_config_change(run, dataclasses.asdict(cfg), checkpoint_step(ckpt), cfg.allow_config_change, free)
    if (ckpt := world.broadcast(ckpt)) is None:
        if mode == "true":
            raise CheckpointError(f"--resume true: {run / 'checkpoints'} holds no checkpoint to resume from "
                                  "(--resume auto starts afresh where there is none)")
        log(f"--resume auto: no checkpoint in {run / 'checkpoints'}: starting at step 1")
        return 0
    start = load_checkpoint(ckpt, model, optimizer)
    log(f"resumed from {ckpt} (step {start})")
    return start


def save_final(model, tokenizer, run: Path, adapter_base: str | None, world: World = World()) -> None:
    """RUN/model (Hugging Face format), written whole or not at all; with LoRA also RUN/adapter, merged into it."""
    if adapter_base is not None:
        adapters = [p for p in model.parameters() if p.requires_grad]
        if world.main:
            with written_directory(run / "adapter", tensor_bytes(adapters)) as tmp:
                save_adapter(model, tmp, adapter_base)
                tokenizer.save(tmp)
        merge_lora(model)
    state = full_state_dict(model)  # a sharded model's weights gathered onto rank 0
    if world.main:
        with written_directory(run / "model", tensor_bytes(state)) as tmp:
            save_model(model, tmp, state=state)
            tokenizer.save(tmp)
    world.barrier()  # no rank exits (ending the job) before the final model is written


def save_run_config(run: Path, cfg, start: int, free: frozenset = RESUME_FREE_FIELDS) -> None:
    if start:
        update_run_config(run, dataclasses.asdict(cfg), free)
    else:
        save_config(cfg, run / "config.yaml")
