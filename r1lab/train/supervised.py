"""Supervised next-token training: the loop pretraining and SFT share, and `r1lab sft --model DIR --data FILE`."""

from __future__ import annotations

import contextlib
import json
import math
import time
from pathlib import Path
from typing import Callable

import torch

from r1lab.config import SFTConfig
from r1lab.cpu.process import setup_training_process
from r1lab.model import moe
from r1lab.model.loading import load_policy, pick_device
from r1lab.model.lora import add_lora
from r1lab.model.tokenizer import Tokenizer
from r1lab.model.transformer import CausalLM
from r1lab.train.backward_step import BackwardStep, check_one_process
from r1lab.train.checkpoint import RESUME_FREE_FIELDS, save_checkpoint
from r1lab.train.distributed import Silent, World, join_world
from r1lab.train.logprobs import idle_pass, token_logprobs, training_precision
from r1lab.train.memory_budget import check_supervised_memory
from r1lab.train.metrics import LOSS_KEYS, open_metrics, training_progress
from r1lab.train.optimizer import cosine_lr, lora_spec, make_optimizer, optimizer_step, set_lr, stop_if_diverged
from r1lab.train.resume import EpochOrder, resume_run, save_final, save_run_config
from r1lab.train.stopping import RunStopped, StopOnInterrupt
from r1lab.train.sft_data import ChatFields, SFTData, build_sft_data, read_conversations
from r1lab.train.sharding import is_sharded, shard_model

StepCallback = Callable[[int, dict], None]
SUPERVISED_BETA2 = 0.95  # see make_optimizer


def sft(cfg: SFTConfig, log=print) -> Path:
    """`r1lab sft`: fine-tune cfg.model on the chat data in cfg.data; returns the final model directory."""
    cfg.check()
    setup_training_process(cfg.threads, cfg.model, cfg.device)
    torch.manual_seed(cfg.seed)
    world, device = join_world(pick_device(cfg.device), cfg.dist_timeout_s)  # torchrun: each rank a share of a batch
    check_one_process(cfg, world)
    log = log if world.main else Silent().log
    run = Path(cfg.out)
    rows = read_conversations(cfg.data, ChatFields.of(cfg))  # a malformed row fails here, before any model is loaded
    lora = lora_spec(cfg)
    model, tokenizer = load_policy(cfg.model, device, cfg.dtype if lora else "float32")  # see grpo.train
    if lora:
        add_lora(model, lora, cfg.seed)
    model.set_activation_checkpointing(cfg.activation_checkpointing)
    if cfg.shard:
        if cfg.batch_size % world.size:  # equal shares: FSDP's ranks must run as many passes as each other
            raise ValueError(f"shard: batch_size {cfg.batch_size} does not divide across {world.size} ranks")
        shard_model(model, world)
    data = build_sft_data(tokenizer, rows, cfg)
    check_supervised_memory(cfg, model, data.train_docs, device, world.size)
    steps = cfg.steps or max(1, math.ceil(cfg.epochs * len(data.train_docs) / cfg.batch_size))
    optimizer = make_optimizer(model, cfg.lr, cfg.weight_decay, SUPERVISED_BETA2)
    # the cosine schedule depends on the number of steps: changing them changes the run
    start = resume_run(run, cfg, model, optimizer, log, world, free=RESUME_FREE_FIELDS - {"steps", "epochs"})
    summary = data.summary()
    if world.main:
        save_run_config(run, cfg, start, free=RESUME_FREE_FIELDS - {"steps", "epochs"})
        (run / "data.json").write_text(json.dumps(summary, indent=2) + "\n")
    log(f"sft: {summary['train']} conversations for training, {summary['heldout']} held out, "
        f"{summary['dropped_too_long']} of {summary['rows']} dropped as longer than max_len {cfg.max_len}; "
        f"{summary['target_tokens']} target tokens of {summary['tokens']}; {steps} steps of {cfg.batch_size} "
        f"conversations = {steps * cfg.batch_size / len(data.train_docs):.2f} epochs")
    logger = open_metrics(run, cfg, start) if world.main else Silent()
    with logger, training_progress(steps, start, keys=LOSS_KEYS) if world.main else Silent() as bar, \
            StopOnInterrupt() as stop:
        if data.eval_docs and start == 0:
            _log_heldout(logger, 0, model, data, tokenizer.pad_id, cfg, world)  # before any training
        train_lm(model, data.train_docs, loss_masks=data.train_masks, steps=steps, batch_size=cfg.batch_size,
                 lr=cfg.lr, warmup=cfg.warmup_steps, pad_id=tokenizer.pad_id, seed=cfg.seed, optimizer=optimizer,
                 start_step=start, micro_batch_size=cfg.micro_batch_size, max_grad_norm=cfg.max_grad_norm,
                 dtype=cfg.dtype, recompute_logits=cfg.recompute_logits,
                 moe_bias_update_speed=cfg.moe_bias_update_speed, mtp_loss_weight=cfg.mtp_loss_weight,
                 world=world, name="sft",
                 optimizer_in_backward=cfg.optimizer_in_backward,
                 on_step=_step_hook(cfg, steps, model, tokenizer, optimizer, data, logger, bar, world, stop))
    _add_stop_tokens(model, tokenizer, data.closers, log)
    save_final(model, tokenizer, run, cfg.model if lora else None, world)
    return run / "model"


def train_lm(model: CausalLM, docs: list[list[int]], *, steps: int, batch_size: int, lr: float, warmup: int,
             pad_id: int, seed: int, optimizer: torch.optim.Optimizer,
             loss_masks: list[list[bool]] | None = None, start_step: int = 0, micro_batch_size: int = 0,
             max_grad_norm: float = 1.0, dtype: str = "float32", recompute_logits: bool = False,
             on_step: StepCallback | None = None, moe_bias_update_speed: float = 0.0, balance_loss_weight: float = 0.0,
             world: World = World(), optimizer_in_backward: bool = False, name: str = "pretrain",
             mtp_loss_weight: float = 0.0) -> list[float]:
    """AdamW on shuffled documents with a cosine learning rate; returns each step's loss. loss_masks restrict the
    loss (None: every real token); on_step(steps_done, metrics) runs after each step."""
    order = EpochOrder(len(docs), seed)
    losses = []
    model.train()
    with BackwardStep(optimizer) if optimizer_in_backward else contextlib.nullcontext() as in_backward:
        for step in range(start_step, steps):
            picked, t_step = order.batch(step, batch_size), time.perf_counter()
            set_lr(optimizer, cosine_lr(step, steps, lr, warmup))
            metrics = lm_step(model, optimizer, [docs[i] for i in picked],
                              None if loss_masks is None else [loss_masks[i] for i in picked], pad_id,
                              micro_batch_size, max_grad_norm, dtype, recompute_logits, moe_bias_update_speed, world,
                              balance_loss_weight, in_backward, mtp_loss_weight)
            metrics.update(lr=optimizer.param_groups[0]["lr"], step_time_s=time.perf_counter() - t_step)
            stop_if_diverged(model, optimizer, step + 1, name, world)  # before on_step can checkpoint the weights
            losses.append(metrics["loss"])
            if on_step is not None:
                on_step(step + 1, metrics)
    return losses


def lm_step(model: CausalLM, optimizer: torch.optim.Optimizer, docs: list[list[int]],
            loss_masks: list[list[bool]] | None, pad_id: int, micro_batch_size: int = 0,
            max_grad_norm: float = 1.0, dtype: str = "float32", recompute_logits: bool = False,
            moe_bias_update_speed: float = 0.0, world: World = World(), balance_loss_weight: float = 0.0,
            in_backward: BackwardStep | None = None, mtp_loss_weight: float = 0.0) -> dict:
    """One optimizer step, the loss the mean over the batch's target tokens however it is split; a non-finite loss
    or gradient skips it. mtp_loss (the mean over MTP depths) is added with mtp_loss_weight, as in DeepSeek-V3."""
    device = next(model.parameters()).device
    n_targets = target_count(docs, loss_masks)  # of the whole batch, which every rank has
    mtp_depth = len(model.mtp) if mtp_loss_weight else 0
    n_mtp_targets = [target_count(docs, loss_masks, skip=k + 1) for k in range(1, mtp_depth + 1)]
    n_docs = len(docs)  # the balance loss is a mean over the whole batch's sequences
    mine = world.share(len(docs))
    docs = docs[mine.start : mine.stop]
    loss_masks = None if loss_masks is None else loss_masks[mine.start : mine.stop]
    size = micro_batch_size or len(docs) or 1
    if size < len(docs):  # micro-batches of like lengths pad less; the loss (a sum over the batch) is unchanged
        by_length = sorted(range(len(docs)), key=lambda i: len(docs[i]))
        docs = [docs[i] for i in by_length]
        loss_masks = None if loss_masks is None else [loss_masks[i] for i in by_length]
    batches = [lm_batch(docs[s : s + size], pad_id, None if loss_masks is None else loss_masks[s : s + size])
               for s in range(0, len(docs), size)]
    optimizer.zero_grad(set_to_none=True)
    total, balance, mtp_total, finite = 0.0, 0.0, 0.0, True
    with moe.count_loads(model) as loads, moe.balance_loss(model, balance_loss_weight):
        for s, (ids, mask) in zip(range(0, len(docs), size), batches):
            moe.mark_real_lengths(model, [len(d) for d in docs[s : s + size]], ids.shape[1])  # MoE loads: no padding
            with training_precision(dtype, device):
                lm_sum, mtp_sums = lm_loss_sums(model, ids.to(device), mask.to(device), recompute_logits, mtp_depth)
            lm_loss = lm_sum / max(1, n_targets)
            mtp_loss = sum(part / max(1, n) for part, n in zip(mtp_sums, n_mtp_targets)) / max(1, mtp_depth)
            extra = moe.take_balance_loss(model) / n_docs
            loss = lm_loss + extra + mtp_loss_weight * mtp_loss
            if not torch.isfinite(loss):
                finite = False
                if not is_sharded(model):
                    break
            if not finite:  # FSDP: the other ranks still run their passes, which this one must join
                idle_pass(model)
                continue
            if in_backward is not None and s + size >= len(docs):
                in_backward.arm()  # the last micro-batch: the earlier ones only add to the gradients
            loss.backward()
            total += lm_loss.item()
            balance += extra.item() if torch.is_tensor(extra) else extra
            mtp_total += mtp_loss.item() if torch.is_tensor(mtp_loss) else mtp_loss
    finite, (total, balance, mtp_total) = world.all(finite), world.sum([total, balance, mtp_total])
    if finite:
        world.sum_gradients(model.parameters())
    world.sum_counts(loads)
    stepped = optimizer_step(model, optimizer, max_grad_norm, finite, in_backward)
    if not stepped["skipped_nonfinite"]:
        moe.update_routing_bias(model, loads, moe_bias_update_speed)
    return {"loss": total, "target_tokens": n_targets, **stepped, **moe.load_metrics(loads),
            **({"moe/balance_loss": balance} if balance_loss_weight else {}),
            **({"mtp_loss": mtp_total} if mtp_depth else {})}


def target_count(docs: list[list[int]], loss_masks: list[list[bool]] | None, skip: int = 1) -> int:
    """The target tokens of a batch (lm_batch's mask[:, skip:]; skip k + 1: MTP depth k)."""
    if loss_masks is None:
        return sum(max(len(d) - skip, 0) for d in docs)
    return sum(sum(mask[skip:]) for mask in loss_masks)


def lm_batch(docs: list[list[int]], pad_id: int,
             loss_masks: list[list[bool]] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded (B, T) ids and the mask of target tokens (loss_masks, or every real token); never padding."""
    T = max(len(d) for d in docs)
    ids = torch.full((len(docs), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(docs), T), dtype=torch.bool)
    for i, d in enumerate(docs):
        ids[i, : len(d)] = torch.tensor(d)
        mask[i, : len(d)] = True if loss_masks is None else torch.tensor(loss_masks[i], dtype=torch.bool)
    return ids, mask


def lm_loss_sum(model: CausalLM, ids: torch.Tensor, mask: torch.Tensor, recompute_logits: bool = False) -> torch.Tensor:
    return lm_loss_sums(model, ids, mask, recompute_logits)[0]


def lm_loss_sums(model: CausalLM, ids: torch.Tensor, mask: torch.Tensor, recompute_logits: bool = False,
                 mtp_depth: int = 0) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Summed next-token cross-entropy over the targets in mask (B, T), and that of each of the first mtp_depth MTP
    depths (depth k predicts k + 1 ahead); only positions that predict a target reach the LM head."""
    h = model.hidden_states(ids)  # (B, T, D); right padding needs no attention mask under causal attention
    mtp_depth = min(mtp_depth, ids.shape[1] - 2)  # a depth needs a token to embed and one to predict
    depths = [h] + (model.mtp_hidden_states(h, ids, depth=mtp_depth) if mtp_depth > 0 else [])  # depth k: (B, T - k, D)
    picks = [mask[:, k + 1 :] for k in range(len(depths))]
    hidden = torch.cat([hk[:, :-1][pick] for hk, pick in zip(depths, picks)])  # (N, D)
    targets = torch.cat([ids[:, k + 1 :][pick] for k, pick in enumerate(picks)])
    logp, _ = token_logprobs(model, hidden, targets, recompute=recompute_logits)
    sums = [-part.sum() for part in logp.split([int(pick.sum()) for pick in picks])]
    return sums[0], sums[1:]


@torch.no_grad()
def heldout_loss(model: CausalLM, docs: list[list[int]], masks: list[list[bool]], pad_id: int,
                 batch_size: int, world: World = World()) -> float:
    """Mean cross-entropy per target token over held-out conversations (ranks share them, unless sharded)."""
    was_training, device = model.training, next(model.parameters()).device
    model.eval()
    total, n = 0.0, 0
    world = World() if is_sharded(model) else world
    mine = world.share(len(docs))
    for s in range(mine.start, mine.stop, batch_size):
        end = min(s + batch_size, mine.stop)
        ids, mask = lm_batch(docs[s:end], pad_id, masks[s:end])
        total += lm_loss_sum(model, ids.to(device), mask.to(device)).item()
        n += int(mask[:, 1:].sum())
    model.train(was_training)
    total, n = world.sum([total, n])
    return total / max(1, n)


def _log_heldout(logger, step: int, model: CausalLM, data: SFTData, pad_id: int, cfg: SFTConfig,
                 world: World = World()) -> None:
    loss = heldout_loss(model, data.eval_docs, data.eval_masks, pad_id, cfg.micro_batch_size or cfg.batch_size, world)
    logger.log_eval(step, "heldout", {"loss": loss})


def _step_hook(cfg: SFTConfig, steps: int, model: CausalLM, tokenizer: Tokenizer, optimizer, data: SFTData,
               logger, bar, world: World, stop: StopOnInterrupt) -> StepCallback:
    """After each SFT step: metrics, progress, held-out loss, checkpoints."""

    def on_step(step: int, metrics: dict) -> None:
        logger.log(step, metrics)
        bar.update(step, metrics)
        if data.eval_docs and (step % cfg.eval_every == 0 or step == steps):
            _log_heldout(logger, step, model, data, tokenizer.pad_id, cfg, world)
        stopping = stop.requested(world)
        if (cfg.save_every and step % cfg.save_every == 0) or step == steps or stopping:
            path = save_checkpoint(Path(cfg.out), step, model, tokenizer, optimizer, world=world,
                                   adapter_base=cfg.model if cfg.lora_rank else None)
            if stopping and step < steps:
                raise RunStopped.at_step(step, path)

    return on_step


def _add_stop_tokens(model: CausalLM, tokenizer: Tokenizer, closers: set[int], log) -> None:
    """The turn-closing tokens the model learned to end with (e.g. <|im_end|>) become stop tokens."""
    extra = sorted(closers - tokenizer.eos_ids)
    if extra:
        model.config.eos_token_id = _with_ids(model.config.eos_token_id, extra)
        if "eos_token_id" in model.config.generation:  # the one field of the user's generation_config that changes
            model.config.generation["eos_token_id"] = _with_ids(model.config.generation["eos_token_id"], extra)
        names = ", ".join(repr(tokenizer.backend.id_to_token(i)) for i in extra)
        log(f"sft: assistant turns end with {names}; added to the model's end-of-text ids (config.json and "
            f"generation_config.json's eos_token_id) so generation stops there")


def _with_ids(current: int | list[int] | None, extra: list[int]) -> list[int]:
    return ([current] if isinstance(current, int) else list(current or [])) + extra
