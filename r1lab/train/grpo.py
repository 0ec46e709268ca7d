"""R1-Zero reinforcement learning with GRPO: `r1lab grpo --model DIR --task NAME_OR_FILE [--config FILE.yaml]`.

One step (grpo_step): sample G completions per prompt, score them, take group-relative advantages, update, log.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import time
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch

from r1lab.config import EvalConfig, GRPOConfig
from r1lab.config.groups import Tools
from r1lab.cpu.process import setup_training_process
from r1lab.engine.engine import Engine
from r1lab.engine.sampling import step_seed
from r1lab.engine.agents import rollout_turns
from r1lab.engine.tools import generate_with_tools
from r1lab.model import moe
from r1lab.model.loading import (DTYPES, check_context, describe_prompts, encode_prompt, load_policy, pick_device,
                                 prompt_text)
from r1lab.model.lora import adapters_disabled, add_lora, has_lora
from r1lab.model.transformer import CausalLM
from r1lab.rewards.environments import is_environment
from r1lab.rewards.learned import add_learned_rewards
from r1lab.rewards.rules import RewardResult, RewardWeights, score_completions
from r1lab.rewards.sandbox.runner import active_layers, sandbox_summary, use_sandbox
from r1lab.rewards.tasks import CodeFileTask, CodeTask, DatasetTask, Problem, Task, get_task
from r1lab.train.backward_step import BackwardStep, check_one_process
from r1lab.train.async_rollouts import AsyncRollouts, check_async
from r1lab.train.checkpoint import checkpoint_extra, save_checkpoint
from r1lab.train.distributed import Silent, World, join_world
from r1lab.train.evaluate import evaluate_policy, heldout_problems, save_json
from r1lab.train.health import RunHealth, weights_fingerprint
from r1lab.train.logprobs import LOGITS_CHUNK_BYTES, idle_pass, token_logprobs, training_precision
from r1lab.train.memory_budget import check_grpo_memory
from r1lab.train.metrics import MetricsLogger, open_metrics, save_samples, training_progress
from r1lab.train.objective import (clipped_surrogate_loss, group_advantages, k3_kl, mismatch_kind, mismatch_weights,
                                   policy_loss, token_weights, uniform_groups)
from r1lab.train.optimizer import constant_lr, lora_spec, make_optimizer, optimizer_step, set_lr, stop_if_diverged
from r1lab.train.phases import PhaseClock
from r1lab.train.resume import EpochOrder, resume_run, save_final, save_run_config
from r1lab.train.stopping import RunStopped, StopOnInterrupt
from r1lab.train.supervised import lm_batch
from r1lab.train.sharding import full_tensor, held_bytes, is_sharded, shard_model
from r1lab.train.task_settings import (announce_answer_format, check_settings, model_rewards,
                                      scoring_keywords)

RL_BETA2 = 0.99  # see make_optimizer
ZERO_VARIANCE_PATIENCE = 3  # steps in a row with no group's rewards differing before the run says nothing is learned


def train(cfg: GRPOConfig, log=print) -> Path:
    """Run GRPO; returns the directory of the final Hugging Face-format model."""
    check_settings(cfg)
    cfg = dataclasses.replace(cfg, mismatch_correction=mismatch_kind(cfg))  # the run's config records which
    setup_training_process(cfg.threads, cfg.model, cfg.device)
    torch.manual_seed(cfg.seed)
    world, device = join_world(pick_device(cfg.device), cfg.dist_timeout_s)
    check_world(cfg, world)
    check_async(cfg, world, device)
    check_grpo_memory(cfg, device, world.size)
    log = log if world.main else Silent().log  # rank 0 alone speaks and writes; the others train
    run = Path(cfg.out)
    task = get_task(cfg.task, **cfg.task_options)  # a malformed data file fails here, before anything is loaded
    if isinstance(task, DatasetTask):
        log(f"grpo: {cfg.task}: {task.split_summary()}")
    lora = lora_spec(cfg)
    # LoRA: the frozen base may stay in bf16 (no float32 master weights to keep); the adapters train in float32
    model, tokenizer = load_policy(cfg.model, device, cfg.dtype if lora else "float32")
    answer_format = announce_answer_format(cfg, tokenizer, task, log)  # auto: what the template or the data implies
    if lora:
        add_lora(model, lora, cfg.seed)
    ref_model = reference_policy(model, cfg)
    rollout = rollout_policy(model, cfg)  # before any sharding: the engine samples from full weights
    if cfg.shard:
        shard_model(model, world)
    stream = PromptStream(task, cfg)
    eval_cfg = heldout_config(cfg)
    eval_problems = heldout_problems(task, "test", cfg.eval_problems, cfg.seed) if cfg.eval_every else []
    # every data row (or, for a generator, a step's draw) must fit the context with max_new_tokens, before any step
    check_context(model, tokenizer, (stream.pool or stream.batch(0)) + eval_problems, cfg.template, cfg.prefill,
                  cfg.max_new_tokens, cfg.task, cfg.system)
    isolation = sandbox_metrics(task, log, cfg.tools, cfg.sandbox)
    optimizer = make_optimizer(model, cfg.lr, cfg.weight_decay, RL_BETA2)
    start = resume_run(run, cfg, model, optimizer, log, world)
    if start:
        sync_rollout_policy(rollout, model)  # the resumed weights
    engine = Engine(rollout, tokenizer, speculative=cfg.speculative, speculative_tokens=cfg.speculative_tokens)
    if world.main:
        save_run_config(run, cfg, start)
    log(f"grpo: {describe_prompts(tokenizer, stream.batch(start)[0], cfg.template, cfg.prefill, cfg.system)}")
    log(f"grpo: {cfg.prompts_per_step} prompts x {cfg.samples_per_prompt} samples = "
        f"{cfg.prompts_per_step * cfg.samples_per_prompt} rollouts per step, micro-batches of {cfg.micro_batch_size}, "
        f"{cfg.updates_per_batch} update(s) per batch, {cfg.steps} steps, device {device}"
        + (f", {world.size} ranks ({cfg.prompts_per_step // world.size} prompts each)" if world.distributed else ""))
    done, trained_s, saved, streak = start, 0.0, {start} if start else set(), 0

    def checkpoint(steps_done: int) -> Path:
        """The checkpoint after steps_done steps, saved once (after the held-out evaluations of earlier steps)."""
        if steps_done not in saved:
            if source:
                source.report_evaluations()
            save_checkpoint(run, steps_done, model, tokenizer, optimizer, world=world,
                            adapter_base=cfg.model if lora else None, extra=source.state() if source else None)
            saved.add(steps_done)
        return run / "checkpoints" / f"step_{steps_done:06d}"

    health = RunHealth(log)
    logger = open_metrics(run, cfg, start) if world.main else Silent()
    source = async_rollouts(rollout, tokenizer, cfg, stream, log, eval_problems,
                            lambda at, result: report_heldout(logger, run, at, result, log, calls_name(task)))
    with logger, training_progress(cfg.steps, start) if world.main else Silent() as bar, StopOnInterrupt() as stop, \
            source or contextlib.nullcontext():
        if source:
            source.start(start, model, checkpoint_extra(run / "checkpoints" / f"step_{start:06d}") if start else None)
        for step in range(start, cfg.steps):
            if cfg.eval_every and step % cfg.eval_every == 0:
                heldout(logger, run, step, engine, task, eval_cfg, eval_problems, log, world, source)
            metrics = grpo_step(step, model, ref_model, optimizer, engine, task, stream, cfg, run, world, health,
                                source)
            stop_if_diverged(model, optimizer, step + 1, "grpo", world)  # before the step is logged or checkpointed
            streak = metrics["zero_variance_streak"] = zero_variance_streak(streak, metrics, cfg, answer_format, log)
            logger.log(step + 1, {**metrics, **isolation})
            bar.update(step + 1, metrics)
            done = step + 1
            if cfg.save_every and done % cfg.save_every == 0:
                checkpoint(done)
            if stop.requested(world):
                raise RunStopped.at_step(done, checkpoint(done))
            trained_s += metrics["step_time_s"]  # evaluations and checkpoints do not count against the budget
            if cfg.time_limit_s and trained_s >= cfg.time_limit_s:
                log(f"grpo: time limit of {cfg.time_limit_s:.0f} s of training reached after {step + 1} steps")
                break
        checkpoint(done)  # the last step's, so that a longer run (--steps more, --resume) can go on from it
        if cfg.eval_every:
            heldout(logger, run, done, engine, task, eval_cfg, eval_problems, log, world, source)
        if source:
            source.report_evaluations()
    save_final(model, tokenizer, run, cfg.model if lora else None, world)
    return run / "model"


def async_rollouts(rollout: CausalLM, tokenizer, cfg: GRPOConfig, stream: PromptStream, log, eval_problems,
                   report) -> AsyncRollouts | None:
    """The rollout worker of --async-steps (None without); held-out figures go to report(step, result)."""
    if not cfg.async_steps:
        return None

    def draw(step: int) -> tuple[list[Problem], list[int]]:
        return stream.batch(step), [prompt_seed(cfg.seed, step, i) for i in range(cfg.prompts_per_step)]

    evaluate = functools.partial(evaluate_policy, task=stream.task, ec=heldout_config(cfg), problems=eval_problems)
    return AsyncRollouts(rollout, tokenizer, cfg, functools.partial(sample_rollouts, task=stream.task),
                         sync_rollout_policy, draw, log, evaluate if cfg.eval_every else None, report)


def check_world(cfg: GRPOConfig, world: World) -> None:
    """Refuse a batch that does not divide across the ranks: a group never spans ranks."""
    if cfg.prompts_per_step % world.size:
        raise ValueError(f"prompts_per_step {cfg.prompts_per_step} does not divide across {world.size} ranks: give a "
                         f"multiple of {world.size} (each rank samples and trains whole groups)")
    check_one_process(cfg, world)


def grpo_step(step, model, ref_model, optimizer, engine, task, stream, cfg: GRPOConfig, run: Path,
              world: World = World(), health: RunHealth | None = None, source: AsyncRollouts | None = None) -> dict:
    clock = PhaseClock(model.lm_head.weight.device)
    set_lr(optimizer, constant_lr(step, cfg.lr, cfg.warmup_steps))
    problems, mine = stream.batch(step), world.share(cfg.prompts_per_step)  # this rank's share: whole groups
    seeds = [prompt_seed(cfg.seed, step, i) for i in mine]  # per prompt, not per rank: N ranks draw what one would
    drafts = dict(engine.speculative_counts)
    with moe.count_loads(engine.model) as rollout_loads:  # MoE models: expert loads of the rollout's forward passes
        local = source.take(step) if source else sample_rollouts(engine, problems[mine.start : mine.stop], cfg, seeds,
                                                                 task)
    clock.lap("rollout")
    local_result = score_rollouts(task, local, cfg, engine.tokenizer)
    rollouts, result = gather_rollouts(world, local), gather_results(world, local_result)  # the whole batch
    rewards = control_rewards(torch.tensor(result.total, dtype=torch.float32), cfg, step)
    advantages = group_advantages(rewards, cfg.samples_per_prompt, cfg.scale_by_std)
    keep = torch.ones(len(rewards), dtype=torch.bool)
    if cfg.drop_uniform_groups:
        keep = ~uniform_groups(rewards, cfg.samples_per_prompt).repeat_interleave(cfg.samples_per_prompt)
    clock.lap("score")
    update, before, after = {"skipped_nonfinite": 0}, None, None
    if keep.any():  # every rank agrees: keep is the whole batch's
        before = weights_fingerprint(engine.model) if health else None
        G = cfg.samples_per_prompt
        batches = make_micro_batches(rollouts, advantages, keep, cfg, engine.tokenizer.pad_id,
                                     model.lm_head.weight.device, range(mine.start * G, mine.stop * G))
        update = update_policy(model, ref_model, optimizer, batches, cfg, clock, world)
        sync_rollout_policy(engine.model, model)
        after = weights_fingerprint(engine.model) if health else None
        clock.lap("sync")
    if source:  # every step, updated or not: version step + 1 to the worker
        source.after_update(step, model)
        clock.lap("async_wait")
    elapsed = time.perf_counter() - clock.start
    metrics = step_metrics(rewards, result, rollouts, cfg, update)
    if source:
        metrics["async/staleness"] = step - min(rollouts.versions)
    metrics.update({"lr": optimizer.param_groups[0]["lr"], "step_time_s": elapsed,
                    "rollout_time_s": clock.seconds["rollout"], "tokens_per_s": metrics["completion_tokens"] / elapsed,
                    **clock.metrics(), **moe.load_metrics(rollout_loads, "moe/rollout_")})
    if cfg.speculative != "none":  # this rank's rollouts: the share of drafts the policy accepted
        metrics.update(engine.acceptance_since(drafts))
    if health is not None:
        metrics.update(health.check(step + 1, metrics, before, after, optimizer.param_groups[0]["lr"]))
    if cfg.samples_every and step % cfg.samples_every == 0:
        render = lambda p: prompt_text(engine.tokenizer, p, cfg.template, cfg.prefill, cfg.system)  # noqa: E731
        save_samples(run, step, sample_records(rollouts, rewards, result, 2 * cfg.samples_per_prompt, render))
    if metrics["skipped_nonfinite"]:
        print(f"step {step + 1}: non-finite loss or gradient, update skipped")
    return metrics


@dataclass
class Rollouts:
    """G completions per problem, flattened group by group (completion i belongs to group i // G)."""

    problems: list[Problem]
    prompt_ids: list[list[int]]
    completion_ids: list[list[int]]
    old_logprobs: list[list[float]]
    texts: list[str]
    truncated: list[bool]
    # per completion with tools or an environment; empty without
    model_mask: list[list[bool]] = field(default_factory=list)  # True on the model's tokens, False on tool output
    tool_calls: list[int] = field(default_factory=list)  # tool calls, or environment replies
    tool_failures: list[int] = field(default_factory=list)
    tool_timeouts: list[int] = field(default_factory=list)  # environment replies past their time
    conversations: list[list[dict]] = field(default_factory=list)  # with an environment: the turns after the prompt
    rewrites: list[int] = field(default_factory=list)  # an agent's requests that rewrote history (engine/agents.py)
    versions: list[int] = field(default_factory=list)  # async rollouts: the policy version each was sampled from

    def trained_mask(self, i: int) -> list[bool]:
        return self.model_mask[i] if self.model_mask else [True] * len(self.completion_ids[i])


class PromptStream:
    """The problems for each step, a pure function of (seed, step)."""

    def __init__(self, task: Task, cfg: GRPOConfig):
        self.task, self.cfg = task, cfg
        # a data file is walked in shuffled epochs; a generator draws fresh problems every step
        self.pool = task.problems("train", None, cfg.seed) if isinstance(task, DatasetTask) else None
        self.order = EpochOrder(len(self.pool), cfg.seed) if self.pool else None

    def batch(self, step: int) -> list[Problem]:
        n = self.cfg.prompts_per_step
        if self.pool is None:
            return self.task.problems("train", n, step_seed(self.cfg.seed, step, "prompts"))
        return [self.pool[i] for i in self.order.batch(step, n)]


def prompt_seed(seed: int, step: int, prompt: int) -> int:
    return step_seed(seed, step, f"sample/{prompt}")


def gather_rollouts(world: World, local: Rollouts) -> Rollouts:
    if not world.distributed:
        return local
    parts = world.gather(local)
    return Rollouts(**{f.name: [x for part in parts for x in getattr(part, f.name)] for f in fields(Rollouts)})


def sample_rollouts(engine: Engine, problems: list[Problem], cfg: GRPOConfig, seed: int | list[int],
                    task: Task | None = None) -> Rollouts:
    G, tok = cfg.samples_per_prompt, engine.tokenizer
    prompts = [encode_prompt(tok, p, cfg.template, cfg.prefill, cfg.system) for p in problems]
    sampling = dict(num_samples=G, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                    top_k=cfg.top_k, seed=seed, suppress_eos=cfg.suppress_eos, max_rows=cfg.rollout_slots)
    turns = rollout_turns(cfg, task, problems, tok)
    samples = generate_with_tools(engine, prompts, turns, **sampling) if turns else engine.generate(prompts, **sampling)
    rollouts = Rollouts(problems=[problems[s.prompt_index] for s in samples],
                        prompt_ids=[getattr(s, "prompt_ids", None) or prompts[s.prompt_index] for s in samples],
                        completion_ids=[s.token_ids for s in samples], old_logprobs=[s.logprobs for s in samples],
                        texts=[s.text for s in samples], truncated=[s.finish_reason == "length" for s in samples])
    if turns:
        rollouts.model_mask = [s.model_mask for s in samples]
        rollouts.tool_calls, rollouts.tool_failures = [s.calls for s in samples], [s.failures for s in samples]
        rollouts.tool_timeouts, rollouts.rewrites = [s.timeouts for s in samples], [s.rewrites for s in samples]
    if is_environment(task):
        rollouts.conversations = [s.messages for s in samples]
    return rollouts


def score_rollouts(task: Task, rollouts: Rollouts, cfg: GRPOConfig, tokenizer) -> RewardResult:
    scoring = scoring_keywords(cfg, tokenizer, task)
    result = score_completions(task, rollouts.problems, rollouts.conversations or rollouts.texts,
                               RewardWeights(cfg.accuracy_weight, cfg.format_weight, cfg.language_weight, cfg.language,
                                             tuple(cfg.reward_functions.items())),
                               cfg.reward_timeout_s, **scoring)
    if is_environment(task):  # its replies' failures, as its scoring's
        result.errors += sum(rollouts.tool_failures)
        result.timeouts += sum(rollouts.tool_timeouts)
    if cfg.judge_url or cfg.reward_model:  # reward/judge, reward/reward_model
        add_learned_rewards(result, model_rewards(cfg), rollouts.problems, rollouts.texts, scoring["response_prefix"])
    if cfg.tools and cfg.tool_failure_penalty:  # a component like the others: reward/tool_failures is logged
        failures = [float(f) for f in rollouts.tool_failures]
        result.components["tool_failures"] = failures
        result.total = [t - cfg.tool_failure_penalty * f for t, f in zip(result.total, failures)]
    return result


def gather_results(world: World, local: RewardResult) -> RewardResult:
    if not world.distributed:
        return local
    parts = world.gather(local)
    return RewardResult(total=[x for p in parts for x in p.total],
                        components={k: [x for p in parts for x in p.components[k]] for k in local.components},
                        correct=[x for p in parts for x in p.correct], answers=[x for p in parts for x in p.answers],
                        errors=sum(p.errors for p in parts), timeouts=sum(p.timeouts for p in parts))


def control_rewards(rewards: torch.Tensor, cfg: GRPOConfig, step: int) -> torch.Tensor:
    """The rewards as scored, or for the random-reward control, shuffled across completions (no signal)."""
    if cfg.control != "random-reward":
        return rewards
    generator = torch.Generator().manual_seed(step_seed(cfg.seed, step, "control"))
    return rewards[torch.randperm(len(rewards), generator=generator)]


@dataclass
class MicroBatch:
    """Sequences grouped by prompt: each distinct prompt is computed once."""

    prompts: torch.Tensor  # (U, P) the distinct prompts of this micro-batch, left-padded
    prompt_mask: torch.Tensor  # (U, P) True on real prompt tokens
    rows: torch.Tensor  # (B,) the prompt (index into prompts) each completion continues
    completions: torch.Tensor  # (B, C) completion tokens, right-padded
    completion_mask: torch.Tensor  # (B, C) True on the real completion tokens (all attended to)
    old_logp: torch.Tensor  # (N,) sampling log-probs of the N trained tokens (row-major order below)
    advantages: torch.Tensor  # (N,) each token carries its sequence's advantage
    weights: torch.Tensor  # (N,) per-token loss weight implementing the normalisation
    trainer_old_logp: torch.Tensor | None = None  # (N,) the trainer's log-probs at the first update (set then)
    trained_mask: torch.Tensor | None = None  # (B, C) the N trained tokens (not tool output); None: completion_mask

    @property
    def trained(self) -> torch.Tensor:
        return self.completion_mask if self.trained_mask is None else self.trained_mask

    def sequence_of_tokens(self) -> torch.Tensor:
        rows = torch.arange(len(self.completions), device=self.completions.device)
        return rows[:, None].expand_as(self.trained)[self.trained]


def make_micro_batches(rollouts: Rollouts, advantages: torch.Tensor, keep: torch.Tensor, cfg: GRPOConfig,
                       pad_id: int, device, share: range | None = None) -> list[MicroBatch]:
    """Micro-batches of the sequences in share (default all), weights normalised over the whole batch's kept ones."""
    rows = keep.nonzero().squeeze(-1)
    # a sequence's length is its trained tokens: tool outputs count neither in the loss nor in its normalisation
    lengths = torch.tensor([sum(rollouts.trained_mask(i)) for i in rows.tolist()])
    seq_weights = token_weights(lengths, cfg.loss_norm, cfg.max_new_tokens)  # normalised over every kept sequence
    trained = torch.ones(len(rows), dtype=torch.bool)
    if share is not None:
        trained &= (rows >= share.start) & (rows < share.stop)
    if cfg.skip_zero_advantage and cfg.kl_coef == 0:
        # without a KL term, a zero advantage gives exactly zero gradient: skip those passes, same update
        trained &= advantages[rows] != 0
    rows, lengths, seq_weights = rows[trained], lengths[trained], seq_weights[trained]
    rows = rows.tolist()
    batches = []
    for start in range(0, len(rows), cfg.micro_batch_size):
        chunk = rows[start : start + cfg.micro_batch_size]
        per_seq = lengths[start : start + len(chunk)]
        prompts, prompt_mask, prompt_of = _distinct_prompts([rollouts.prompt_ids[i] for i in chunk], pad_id)
        completions, completion_mask = lm_batch([rollouts.completion_ids[i] for i in chunk], pad_id)
        trained = lm_batch([rollouts.trained_mask(i) for i in chunk], False)[0].bool()  # (B, C)
        old = torch.tensor([lp for i in chunk for lp, m in zip(rollouts.old_logprobs[i], rollouts.trained_mask(i))
                            if m])
        batches.append(MicroBatch(prompts.to(device), prompt_mask.to(device), prompt_of.to(device),
                                  completions.to(device), completion_mask.to(device), old.to(device),
                                  advantages[chunk].repeat_interleave(per_seq).to(device),
                                  seq_weights[start : start + len(chunk)].repeat_interleave(per_seq).to(device),
                                  trained_mask=None if not rollouts.model_mask else trained.to(device)))
    return batches


def _distinct_prompts(prompts: list[list[int]], pad_id: int):
    """(U, P) left-padded distinct prompts, their mask, and each sequence's index into them (B,)."""
    index: dict[tuple, int] = {}
    prompt_of = torch.tensor([index.setdefault(tuple(p), len(index)) for p in prompts])
    distinct = [list(p) for p in index]
    P = max(map(len, distinct))
    ids = torch.tensor([[pad_id] * (P - len(p)) + p for p in distinct])
    mask = torch.tensor([[False] * (P - len(p)) + [True] * len(p) for p in distinct])
    return ids, mask, prompt_of


def update_policy(model: CausalLM, ref_model: CausalLM | None, optimizer, batches: list[MicroBatch],
                  cfg: GRPOConfig, clock: PhaseClock | None = None, world: World = World()) -> dict:
    """updates_per_batch optimizer steps, gradients summed over ranks; a non-finite loss on any rank skips a step."""
    clock = clock or PhaseClock(model.lm_head.weight.device)
    totals = {"loss": 0.0, "clipped": 0.0, "kl": 0.0, "entropy": 0.0, "entropy_tokens": 0, "tokens": 0.0,
              "grad_norm": 0.0, "skipped": 0, "logp_diff_sum": 0.0, "logp_diff_max": 0.0, "logp_diff_tokens": 0,
              "ratio_sum": 0.0, "ratio_min": float("inf"), "ratio_max": 0.0}
    loads: dict = {}  # MoE models: tokens per expert in these forward passes, per layer
    # FSDP: every rank runs as many passes as the busiest one (each pass gathers weights with all ranks)
    passes = max(world.gather(len(batches))) if is_sharded(model) else len(batches)
    with BackwardStep(optimizer) if cfg.optimizer_in_backward else contextlib.nullcontext() as in_backward:
        for update in range(cfg.updates_per_batch):
            _update(model, ref_model, optimizer, batches, passes, cfg, update, totals, loads, clock, world,
                    in_backward)
    held = held_bytes(model, optimizer)  # this rank's share, gradients included (freed just below)
    optimizer.zero_grad(set_to_none=True)
    _sum_totals(world, totals)
    tokens, updates = max(totals["tokens"], 1.0), cfg.updates_per_batch
    return {"loss": totals["loss"] / updates, "clip_fraction": totals["clipped"] / tokens,
            "kl": totals["kl"] / tokens if ref_model is not None else None,
            "entropy": totals["entropy"] / totals["entropy_tokens"] if totals["entropy_tokens"] else None,
            "grad_norm": totals["grad_norm"] / updates, "skipped_nonfinite": totals["skipped"],
            **{f"memory/rank_{k}_mb": v / 2**20 for k, v in held.items()}, **_sampler_gap(totals),
            **moe.load_metrics(loads)}


def _update(model, ref_model, optimizer, batches, passes: int, cfg: GRPOConfig, update: int, totals: dict, loads: dict,
            clock: PhaseClock, world: World, in_backward: BackwardStep | None) -> None:
    """One optimizer step over the micro-batches (with in_backward, stepped during the last backward pass)."""
    optimizer.zero_grad(set_to_none=True)
    with moe.count_loads(model) as counted:
        finite = _run_micro_batches(model, ref_model, batches, passes, cfg, update, totals, in_backward)
    finite, trained = world.all(finite), not world.all(not batches)
    if finite and not trained:  # every sequence had zero advantage: a zero gradient, and the optimizer still steps
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
    if finite:
        world.sum_gradients(model.parameters())
    world.sum_counts(counted)
    clock.lap("forward_backward")
    stepped = optimizer_step(model, optimizer, cfg.max_grad_norm, finite, in_backward)
    clock.lap("optimizer")
    if not stepped["skipped_nonfinite"]:  # DeepSeek-V3's routing bias, toward an even load
        moe.update_routing_bias(model, counted, cfg.moe_bias_update_speed)
    moe.add_loads(loads, counted)
    totals["skipped"] += stepped["skipped_nonfinite"]
    totals["grad_norm"] += 0.0 if stepped["skipped_nonfinite"] else stepped["grad_norm"]


def _run_micro_batches(model, ref_model, batches: list[MicroBatch], passes: int, cfg: GRPOConfig, update: int,
                       totals: dict, in_backward: BackwardStep | None = None) -> bool:
    """Forward and backward of each micro-batch; False on a non-finite loss. Under FSDP, idle passes make up
    `passes` (each pass is a collective), also after a non-finite loss."""
    finite = True
    for i in range(passes):
        if finite and i < len(batches):
            if in_backward is not None and i == len(batches) - 1:
                in_backward.arm()  # the earlier micro-batches only add to the gradients
            if _micro_batch_loss(model, ref_model, batches[i], cfg, update, totals):
                continue
            finite = False
            if not is_sharded(model):
                break
        idle_pass(model, completions=True)
    return finite


def _sum_totals(world: World, totals: dict) -> None:
    """Every rank's figures, as one process would count them (grad_norm and skipped are already equal)."""
    extremes = {"logp_diff_max": max, "ratio_max": max, "ratio_min": min}
    summed = [k for k in totals if k not in ("grad_norm", "skipped", *extremes)]
    totals.update(zip(summed, world.sum([totals[k] for k in summed])))
    if world.distributed:
        for key, pick in extremes.items():
            totals[key] = pick(world.gather(totals[key]))


def _micro_batch_loss(model, ref_model, mb: MicroBatch, cfg: GRPOConfig, update: int, totals: dict) -> bool:
    """Forward and backward of one micro-batch, adding to totals; False (nothing done) on a non-finite loss."""
    with training_precision(cfg.dtype, mb.completions.device):
        logp, entropy = completion_logprobs(model, mb, cfg.temperature, with_entropy=update == 0,
                                            recompute_logits=cfg.recompute_logits, fp32_head=cfg.fp32_lm_head)
    if update == 0:
        mb.trainer_old_logp = logp.detach()  # the policy before this batch's updates, as the trainer computes it
    old, weights = _old_policy(logp, mb, cfg)
    ref = None
    if ref_model is not None:  # the policy itself under LoRA: its base, with the adapters off
        base_only = adapters_disabled(model) if ref_model is model else contextlib.nullcontext()
        with torch.no_grad(), training_precision(cfg.dtype, mb.completions.device), base_only:
            ref = completion_logprobs(ref_model, mb, cfg.temperature, fp32_head=cfg.fp32_lm_head)[0]
    if cfg.policy_loss == "ppo-clip" and weights is None:  # GRPO as it always was
        token_loss, clipped, kl = clipped_surrogate_loss(logp, old, mb.advantages, cfg.clip_low, cfg.clip_high,
                                                         ref, cfg.kl_coef)
    else:
        token_loss, clipped = policy_loss(cfg.policy_loss, logp, old, mb.advantages, cfg.clip_low, cfg.clip_high,
                                          mb.sequence_of_tokens())
        token_loss = token_loss if weights is None else token_loss * weights
        kl = k3_kl(logp, ref) if ref is not None and cfg.kl_coef else None
        token_loss = token_loss if kl is None else token_loss + cfg.kl_coef * kl
    loss = (token_loss * mb.weights).sum()
    if not torch.isfinite(loss):
        return False
    loss.backward()
    totals["loss"] += loss.item()
    totals["clipped"] += clipped.float().sum().item()
    totals["tokens"] += len(logp)
    if kl is not None:
        totals["kl"] += kl.detach().sum().item()
    if entropy is not None:
        totals["entropy"] += entropy.sum().item()
        totals["entropy_tokens"] += len(entropy)
    if len(logp):  # sampler vs trainer: the importance ratio every update, the log-prob gap before any update
        gap = logp.detach() - mb.old_logp
        ratio, abs_gap = torch.exp(gap), gap.abs()
        # one host round trip for the five figures (each .item() would wait for the device)
        r_sum, r_min, r_max, g_sum, g_max = torch.stack([ratio.sum(), ratio.min(), ratio.max(), abs_gap.sum(),
                                                         abs_gap.max()]).tolist()
        totals["ratio_sum"] += r_sum
        totals["ratio_min"], totals["ratio_max"] = min(totals["ratio_min"], r_min), max(totals["ratio_max"], r_max)
        if update == 0:  # same weights: only precision can differ
            totals["logp_diff_sum"] += g_sum
            totals["logp_diff_max"] = max(totals["logp_diff_max"], g_max)
            totals["logp_diff_tokens"] += len(gap)
    return True


def _old_policy(logp: torch.Tensor, mb: MicroBatch, cfg: GRPOConfig) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The old log-probs the ratio is taken against, and the mismatch correction's weights (or None). Without a
    correction and a single synchronous update, detach() gives the exact ratio of 1; otherwise the sampler's.
    With TIS / MIS, the trainer's log-probs before the updates, the sampler gap a separate capped weight."""
    kind = mismatch_kind(cfg)
    if kind == "none":  # async rollouts come from an older policy: the sampler's log-probs are the old policy
        return (logp.detach() if cfg.updates_per_batch == 1 and not cfg.async_steps else mb.old_logp), None
    return mb.trainer_old_logp, mismatch_weights(mb.trainer_old_logp, mb.old_logp, kind, cfg.mismatch_cap)


def heldout_config(cfg: GRPOConfig) -> EvalConfig:
    """The held-out evaluation's settings: `r1lab eval`'s with the eval_* fields."""
    same = ("model", "task", "max_new_tokens", "template", "prefill", "system", "answer_format", "language",
            "reward_timeout_s", "seed", "speculative", *Tools.__annotations__)
    return EvalConfig(task_options=dict(cfg.task_options), problems=cfg.eval_problems, samples=cfg.eval_samples,
                      temperature=cfg.eval_temperature, top_p=cfg.eval_top_p, **{n: getattr(cfg, n) for n in same})


def completion_logprobs(model: CausalLM, mb: MicroBatch, temperature: float, with_entropy: bool = False,
                        recompute_logits: bool = False, chunk_bytes: int = LOGITS_CHUNK_BYTES, fp32_head: bool = False):
    """Log-probs (N,) of the N trained tokens under softmax(logits / temperature); only they reach the LM head."""
    hidden = model.completion_hidden_states(mb.prompts, mb.prompt_mask, mb.rows, mb.completions,
                                            mb.completion_mask)[mb.trained]  # (N, D)
    return token_logprobs(model, hidden, mb.completions[mb.trained], temperature, recompute=recompute_logits,
                          with_entropy=with_entropy, chunk_bytes=chunk_bytes,
                          head_dtype=torch.float32 if fp32_head else None)


def _sampler_gap(totals: dict) -> dict:
    """logprob_diff/{mean,max}: |trainer - sampler log-prob| of the trained tokens before any update;
    importance_ratio/{mean,min,max}: p_trainer / p_sampler over every update."""
    out = {}
    if totals["logp_diff_tokens"]:
        out.update({"logprob_diff/mean": totals["logp_diff_sum"] / totals["logp_diff_tokens"],
                    "logprob_diff/max": totals["logp_diff_max"]})
    if totals["tokens"]:  # each update counts its tokens once, as ratio_sum does
        out.update({"importance_ratio/mean": totals["ratio_sum"] / totals["tokens"],
                    "importance_ratio/min": totals["ratio_min"], "importance_ratio/max": totals["ratio_max"]})
    return out


def reference_policy(model: CausalLM, cfg: GRPOConfig) -> CausalLM | None:
    """The KL term's frozen reference: a copy of the policy, or under LoRA the policy itself (adapters off)."""
    if not cfg.kl_coef:
        return None
    if has_lora(model):
        return model
    return copy.deepcopy(model).to(DTYPES[cfg.dtype]).requires_grad_(False)


def rollout_policy(model: CausalLM, cfg: GRPOConfig) -> CausalLM:
    """The weights the engine samples from: the policy itself in float32 or under LoRA; otherwise (bf16, or shard)
    a frozen copy in the training dtype, kept equal by sync_rollout_policy."""
    if (cfg.dtype == "float32" or has_lora(model)) and not cfg.shard:
        return model
    return copy.deepcopy(model).to(DTYPES[cfg.dtype]).requires_grad_(False).eval()


@torch.no_grad()
def sync_rollout_policy(rollout: CausalLM, model: CausalLM) -> None:
    """The rollout copy's weights := the policy's (gathered, one parameter at a time, when sharded)."""
    if rollout is not model:  # parameters() lists a tied embedding once in both, in the same order
        for r, p in zip(rollout.parameters(), model.parameters()):
            r.copy_(full_tensor(p))
        moe.copy_routing_bias(rollout, model)  # a buffer, updated outside the gradient


def step_metrics(rewards, result: RewardResult, rollouts: Rollouts, cfg: GRPOConfig, update: dict) -> dict:
    lengths = [len(c) for c in rollouts.completion_ids]
    metrics = {"reward/mean": rewards.mean().item()}
    metrics.update({f"reward/{k}": sum(v) / len(v) for k, v in result.components.items()})
    metrics.update({
        "accuracy": sum(result.correct) / len(result.correct),
        "zero_variance_groups": uniform_groups(rewards, cfg.samples_per_prompt).float().mean().item(),
        "completion_len/mean": sum(lengths) / len(lengths), "completion_len/max": max(lengths),
        "truncated": sum(rollouts.truncated) / len(rollouts.truncated),
        "scorer_errors": result.errors, "scorer_timeouts": result.timeouts, "completion_tokens": sum(lengths),
    })
    metrics.update({k: v for k, v in update.items() if v is not None})
    metrics.update(tool_metrics(rollouts))
    return metrics


def zero_variance_streak(streak: int, metrics: dict, cfg: GRPOConfig, answer_format: str, log) -> int:
    """Steps in a row where every group's rewards were equal (zero gradient); warned once at the patience."""
    streak = streak + 1 if metrics["zero_variance_groups"] >= 1.0 else 0
    if streak == ZERO_VARIANCE_PATIENCE:
        fmt, accuracy, truncated = metrics.get("reward/format", 0.0), metrics["accuracy"], metrics["truncated"]
        log(f"grpo: WARNING: for {streak} steps every group's rewards were all equal (reward "
            f"{metrics['reward/mean']:.2f}, format {fmt:.0%}, accuracy {accuracy:.0%}, truncated {truncated:.0%}): no "
            f"advantage, nothing is learned. Likely causes: the answer format (--answer-format, here {answer_format}; "
            f"a model that answers in \\boxed{{}} after </think> needs boxed, one that writes <answer> tags needs "
            f"tags; see the completions in samples/), a task too hard for the model (accuracy 0: easier task options "
            f"or a stronger base), or max_new_tokens {cfg.max_new_tokens} too short for its reasoning (truncated near "
            f"100%).")
    return streak


def tool_metrics(rollouts: Rollouts) -> dict:
    """tools/* (or env/* for an environment's replies): calls, failures, callers, and the outputs' token share."""
    if not rollouts.model_mask:
        return {}
    calls, failures, n = sum(rollouts.tool_calls), sum(rollouts.tool_failures), len(rollouts.tool_calls)
    tokens, kind = sum(len(m) for m in rollouts.model_mask), "env" if rollouts.conversations else "tools"
    return {f"{kind}/calls_per_rollout": calls / n, f"{kind}/failure_rate": failures / calls if calls else 0.0,
            f"{kind}/rollouts_with_calls": sum(c > 0 for c in rollouts.tool_calls) / n,
            f"{kind}/output_token_share": sum(not t for m in rollouts.model_mask for t in m) / max(tokens, 1),
            **({"env/rewritten_history": sum(rollouts.rewrites) / n} if kind == "env" else {})}


def sample_records(rollouts: Rollouts, rewards, result: RewardResult, n: int, render) -> list[dict]:
    """The first n rollouts of a step, with each prompt as rendered for the model."""
    return [{"prompt": rollouts.problems[i].prompt, "prompt_text": render(rollouts.problems[i]),
             "reference": rollouts.problems[i].answer,
             "completion": rollouts.texts[i], "reward": rewards[i].item(), "answer": result.answers[i],
             "correct": result.correct[i], "components": {k: v[i] for k, v in result.components.items()},
             **({"tool_calls": rollouts.tool_calls[i], "tool_failures": rollouts.tool_failures[i]}
                if rollouts.tool_calls else {})}
            for i in range(min(n, len(rollouts.texts)))]


def sandbox_metrics(task: Task, log, tools: str = "", sandbox: str = "auto") -> dict:
    """Sets the sandbox; for a code task or tool calls, its isolation layers as per-step metrics (sandbox/LAYER: 1,
    sandbox/none where opted out), so every run records what stood between the policy's code and the host."""
    use_sandbox(sandbox)
    if not isinstance(task, (CodeTask, CodeFileTask)) and not tools:
        return {}
    what = "code rewards" if not tools else "tool calls" if not isinstance(task, (CodeTask, CodeFileTask)) else \
        "code rewards and tool calls"
    log(f"grpo: {what} run {sandbox_summary(sandbox)}")
    return {f"sandbox/{layer}": 1.0 for layer in (("none",) if sandbox == "none" else active_layers(sandbox))}


def heldout(logger: MetricsLogger, run: Path, step: int, engine: Engine, task: Task, eval_cfg, problems, log,
            world: World = World(), source: AsyncRollouts | None = None) -> None:
    """The held-out evaluation (ranks share it; async: in the worker), announced since it can take minutes."""
    log(f"grpo: held-out evaluation at step {step}: {len(problems)} problems x {eval_cfg.samples} samples")
    if source:
        return source.evaluate(step, engine.model)
    result = evaluate_policy(engine, task, eval_cfg, problems, world)
    if world.main:
        report_heldout(logger, run, step, result, log, calls_name(task))


def calls_name(task: Task) -> str:
    return "environment replies" if is_environment(task) else "tool calls"


def report_heldout(logger: MetricsLogger, run: Path, step: int, result, log, calls: str = "tool calls") -> None:
    """Print, log and save (with every completion) a held-out evaluation's figures."""
    log(f"grpo: held-out at step {step}: pass@1 {result.pass_at_1:.1%}, cons@{result.k} {result.cons_at_k:.1%}, "
        f"format {result.format_rate:.1%}, length {result.mean_length:.1f} tokens"
        + ("" if result.tool_calls is None else f", {result.tool_calls:.2f} {calls} per sample"))
    logger.log_eval(step, "heldout", result.to_dict())
    save_json(run / "eval" / f"step_{step:06d}.json", {"heldout": result})  # with every completion, for reading
