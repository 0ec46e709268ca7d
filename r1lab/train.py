"""The pieces every training loop shares (pretraining, SFT and GRPO): functions, not a trainer class.

- EpochOrder: which examples each step sees, a pure function of (seed, step), so a resumed run sees what an
  uninterrupted one would;
- make_optimizer, learning-rate schedules, optimizer_step (skips a non-finite gradient and reports it);
- resume_run, save_run_config: continue from the newest intact checkpoint of a run directory, refusing settings
  that would change the run (unless allow_config_change, which is recorded);
- token_logprobs: per-token log-probs from hidden states, chunked over tokens and optionally recomputed in the
  backward pass, so that a 150k-token vocabulary never needs N x V logits at once;
- training_precision: bf16 autocast over float32 master weights.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import random
from pathlib import Path

import torch

from r1lab.backward_step import BackwardStep, add_product, deferred_products
from r1lab.checkpoint import (RESUME_FREE_FIELDS, check_config_change, checkpoint_step, find_resume_checkpoint,
                              load_checkpoint, update_run_config)
from r1lab.config import lora_target_names, save_config
from r1lab.distributed import World
from r1lab.grad_buffers import release_gradients, zeroed_gradient
from r1lab.lora import LoRASpec, merge_lora, save_adapter
from r1lab.model import save_model
from r1lab.sharding import full_state_dict
from r1lab.policy import DTYPES, step_seed

# Large enough that each chunk's three products with the (V, D) head are efficient matrix products: at the
# Qwen2.5-0.5B shape (V = 151,936) a 256-token forward + backward took 2.26 s in 16 MB chunks (27 rows), 1.35 s in
# 256 MB ones, on 2 CPU cores. Without recompute every chunk's log-softmax is kept anyway; this bounds the transient.
LOGITS_CHUNK_BYTES = 256 << 20


class EpochOrder:
    """Positions in an endless sequence of shuffled epochs over n examples; each epoch's shuffle is seeded by
    (seed, epoch) alone, so step s's batch is computed without replaying the epochs before it."""

    def __init__(self, n: int, seed: int):
        if n < 1:
            raise ValueError("EpochOrder needs at least one example")
        self.n, self.seed = n, seed

    def batch(self, step: int, size: int) -> list[int]:
        """The example indices of step `step`, `size` of them; a batch runs on across an epoch boundary."""
        return [self._epoch(p // self.n)[p % self.n] for p in range(step * size, (step + 1) * size)]

    @functools.lru_cache(maxsize=4)
    def _epoch(self, epoch: int) -> list[int]:
        return random.Random(step_seed(self.seed, epoch, "epoch")).sample(range(self.n), self.n)


def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float, beta2: float) -> torch.optim.Optimizer:
    """AdamW. beta2 is the caller's on purpose: pretraining and SFT take large steps on fresh data (0.95 follows the
    gradient's scale quickly, as LM pretraining does), while RL on a trained policy takes small, noisy ones (0.99
    averages the noise of a few rollouts per step)."""
    # fused: one kernel per parameter, where the default (foreach) builds temporaries the size of all the weights at
    # once (about 1 GB at 0.5B parameters in float32) and takes several times longer on a CPU. Only the parameters
    # that train (LoRA: the adapters) have state.
    trained = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(trained, lr=lr, betas=(0.9, beta2), weight_decay=weight_decay, fused=True)


def lora_spec(cfg) -> LoRASpec | None:
    """The LoRA adapters cfg asks for (lora_rank, lora_alpha, lora_targets), or None for full fine-tuning."""
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
    """Clip (max_grad_norm 0: no clipping) and apply the accumulated gradients; a non-finite loss or gradient drops
    the step instead, leaving the weights as they were. Returns grad_norm (NaN when dropped) and skipped_nonfinite.
    With in_backward, the backward pass has applied them already: what is left is finished there."""
    if in_backward is not None:
        return in_backward.finish(finite_loss)
    grad_norm = None
    if finite_loss and max_grad_norm:
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
    elif finite_loss:
        grad_norm = torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None])
    if grad_norm is None or not torch.isfinite(grad_norm):
        release_gradients(optimizer)
        return {"grad_norm": float("nan"), "skipped_nonfinite": 1}
    optimizer.step()
    return {"grad_norm": grad_norm.item(), "skipped_nonfinite": 0}


def resume_run(run: Path, cfg, model: torch.nn.Module, optimizer: torch.optim.Optimizer, log,
               world: World = World(), free: frozenset = RESUME_FREE_FIELDS) -> int:
    """The number of steps already done: those of the run's newest intact checkpoint when cfg.resume, else 0.

    A damaged newer checkpoint is named and skipped; settings that differ from the run's (other than `free` ones)
    are refused with the difference, before anything is loaded, unless cfg.allow_config_change. Under torchrun,
    rank 0 chooses and checks; every rank loads (the checkpoint may come from another number of ranks)."""
    if not cfg.resume:
        return 0
    ckpt = None
    if world.main and (ckpt := find_resume_checkpoint(run, log)) is not None:
        check_config_change(run, dataclasses.asdict(cfg), checkpoint_step(ckpt), cfg.allow_config_change, free)
    if (ckpt := world.broadcast(ckpt)) is None:
        return 0
    start = load_checkpoint(ckpt, model, optimizer)
    log(f"resumed from {ckpt} (step {start})")
    return start


def save_final(model, tokenizer, run: Path, adapter_base: str | None, world: World) -> None:
    """RUN/model, the trained model in Hugging Face format; with LoRA also RUN/adapter (PEFT's format, on
    adapter_base) and RUN/model is the adapter merged into the base (the model is done with: merged in place)."""
    if adapter_base is not None:
        if world.main:
            save_adapter(model, run / "adapter", adapter_base)
            tokenizer.save(run / "adapter")
        merge_lora(model)
    state = full_state_dict(model)  # a sharded model's weights gathered onto rank 0
    if world.main:
        save_model(model, run / "model", state=state)
        tokenizer.save(run / "model")
    world.barrier()  # no rank exits (ending the job) before the final model is written


def save_run_config(run: Path, cfg, start: int, free: frozenset = RESUME_FREE_FIELDS) -> None:
    """RUN/config.yaml: the whole config for a new run; on a resume only the free fields are updated, so the file
    keeps saying what the run was started with (allowed changes are in config_changes.jsonl)."""
    if start:
        update_run_config(run, dataclasses.asdict(cfg), free)
    else:
        save_config(cfg, run / "config.yaml")


def training_precision(dtype: str, device: torch.device):
    """bf16 autocast for the training forward passes when dtype is bfloat16 (the weights stay float32)."""
    if dtype == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=DTYPES[dtype])


def token_logprobs(model, hidden: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0,
                   recompute: bool = False, with_entropy: bool = False, chunk_bytes: int = LOGITS_CHUNK_BYTES,
                   head_dtype: torch.dtype | None = None):
    """Log-probs (N,) of targets (N,) under softmax(model.lm_head(hidden) / temperature), hidden (N, D); and, with
    with_entropy, the entropy of one chunk's distributions (a metric: one chunk estimates it well enough).

    The vocabulary projection runs in chunks of at most chunk_bytes of float32 logits, and its backward pass writes
    the LM head's gradient into one (V, D) tensor (see _HeadLogprobs). With recompute, backward recomputes each
    chunk's log-softmax instead of keeping it: memory for one chunk, not N x V floats, for one more projection.
    head_dtype overrides the projection's dtype (float32 under bf16 autocast: the head's logits at full precision)."""
    weight = model.lm_head.weight
    if model.lm_head.bias is not None:
        raise ValueError("token_logprobs expects an LM head without a bias")
    rows = max(1, chunk_bytes // (4 * weight.shape[0]))
    device = hidden.device.type
    compute_dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype
    compute_dtype = head_dtype or compute_dtype  # a float32 head under bf16 autocast, when asked
    logp, entropy = _HeadLogprobs.apply(hidden, weight, targets, temperature, rows, not recompute, compute_dtype,
                                        with_entropy, model.config.tie_word_embeddings)
    return logp, entropy if with_entropy else None


class _HeadLogprobs(torch.autograd.Function):
    """Target log-probs through the LM head, chunk by chunk, with a hand-written backward.

    Autograd through chunked projections would give each chunk its own (V, D) weight gradient to add into the next:
    at a 150k vocabulary that is half a gigabyte written and re-read per chunk, and one extra copy of the LM head's
    gradient held at once. Here every chunk adds into one (V, D) gradient in place, and d logp_t / d logit_j =
    (1[j = t] - p_j) / T is formed from the kept (or recomputed) log-softmax of the chunk.

    A head tied to the embedding gets its gradient written straight into weight.grad, and none returned: autograd
    would otherwise sum it with the lookup's gradient out of place, one more (V, D) tensor at the end of every
    backward. The lookup's (sparse) gradient still reaches the weight through autograd, so the weight's gradient
    hooks (DDP's among them) fire once, with the whole gradient."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature, rows, keep, compute_dtype, with_entropy, tied):
        logps, kept, entropy = [], [], hidden.new_zeros(0, dtype=torch.float32)
        weight_c = weight.to(compute_dtype)  # cast once, not per chunk
        for start in range(0, len(targets), rows):
            logp_all = _chunk_log_softmax(hidden[start : start + rows], weight_c, temperature, compute_dtype)
            logps.append(logp_all.gather(-1, targets[start : start + rows, None]).squeeze(-1))
            if with_entropy and not len(entropy):
                entropy = -logp_all.exp().mul_(logp_all).sum(-1)  # one (n, V) temporary, not two
            if keep:
                kept.append(logp_all)
        ctx.save_for_backward(hidden, weight, targets, *kept)
        ctx.temperature, ctx.rows, ctx.compute_dtype, ctx.tied = temperature, rows, compute_dtype, tied
        ctx.mark_non_differentiable(entropy)
        return (torch.cat(logps) if logps else hidden.new_zeros(0, dtype=torch.float32)), entropy

    @staticmethod
    def backward(ctx, grad_logp, _grad_entropy):
        hidden, weight, targets, *kept = ctx.saved_tensors
        T, rows, dtype = ctx.temperature, ctx.rows, ctx.compute_dtype
        want_hidden, want_weight = ctx.needs_input_grad[:2]
        grad_hidden = torch.empty_like(hidden) if want_hidden else None
        grad_weight = None
        # with the optimizer in the backward pass, a tied head's weight product waits for the end of the backward
        # (the embedding's rows come last anyway): the (V, D) gradient then never coexists with the activations
        deferred = deferred_products(weight) if ctx.tied and kept else None
        if want_weight and deferred is None:
            if ctx.tied and weight.grad is None:
                weight.grad = zeroed_gradient(weight)
            grad_weight = weight.grad if ctx.tied else zeroed_gradient(weight)
        weight_c = weight.to(dtype)
        with _no_autocast(hidden.device.type):
            for i, start in enumerate(range(0, len(targets), rows)):
                h = hidden[start : start + rows]
                logp_all = kept[i] if kept else _chunk_log_softmax(h, weight_c, T, dtype)
                g = grad_logp[start : start + rows, None].float() / T  # (n, 1)
                # in place: the kept (or recomputed) chunk is read only here, and a (n, V) copy would add to the
                # backward's peak, when every activation is still alive
                grad_logits = logp_all.exp_().mul_(-g)
                grad_logits.scatter_add_(-1, targets[start : start + rows, None], g)
                grad_logits = grad_logits.to(dtype)
                if want_hidden:
                    grad_hidden[start : start + rows] = grad_logits @ weight_c
                if want_weight and deferred is not None:
                    deferred.append((grad_logits, h.to(dtype)))  # the kept chunk itself, turned gradient in place
                elif want_weight:
                    add_product(grad_weight, grad_logits, h.to(dtype))
        return grad_hidden, None if ctx.tied else grad_weight, None, None, None, None, None, None, None


def idle_pass(model, completions: bool = False) -> None:
    """A forward and backward pass that adds nothing to any gradient. Under FSDP (r1lab/sharding.py) every pass
    gathers weights and reduces gradients with all ranks at once, so a rank with fewer micro-batches than another
    (or one whose loss was not finite) runs these to keep step with the rest. It takes the same path as the
    others' passes, so that it makes the same collectives in the same order: a whole sequence (SFT), or with
    completions, a prompt and then its completion (GRPO, two forwards through every layer)."""
    device = model.lm_head.weight.device
    token = torch.zeros(1, 1, dtype=torch.long, device=device)
    if completions:
        real = torch.ones(1, 1, dtype=torch.bool, device=device)
        hidden = model.completion_hidden_states(token, real, token[0], token, real)[0]
    else:
        hidden = model.hidden_states(token)[0]
    logp, _ = token_logprobs(model, hidden, token[0])
    (logp.sum() * 0.0).backward()


def _chunk_log_softmax(hidden, weight_c, temperature: float, dtype: torch.dtype) -> torch.Tensor:
    """(n, V) float32 log-softmax of the chunk's logits / temperature, the projection in dtype (weight_c is in it)."""
    with _no_autocast(hidden.device.type):
        logits = (hidden.to(dtype) @ weight_c.t()).float()
    return torch.log_softmax(logits / temperature if temperature != 1.0 else logits, -1)


def _no_autocast(device_type: str):
    return torch.autocast(device_type=device_type, enabled=False)
