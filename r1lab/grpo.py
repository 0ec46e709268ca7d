"""R1-Zero reinforcement learning with GRPO: `r1lab grpo --model DIR --task NAME_OR_FILE [--config FILE.yaml]`.

One step, top to bottom:
  1. sample   prompts_per_step problems, G completions each, from the policy itself (same weights, no sync)
  2. score    each completion with the task's rule rewards (accuracy + format), the same scorer evaluation uses
  3. advantage  group-relative: each reward against its group's mean (and std)
  4. update   clipped surrogate (+ optional k3 KL to a frozen reference), updates_per_batch gradient steps
  5. log      metrics (JSONL + TensorBoard), sample completions, held-out evaluation, checkpoints
"""

from __future__ import annotations

import contextlib
import copy
import functools
import hashlib
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.utils.checkpoint

from r1lab.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from r1lab.config import GRPOConfig, save_config
from r1lab.engine import Engine
from r1lab.evaluate import EvalResult, evaluate, save_json
from r1lab.metrics import MetricsLogger, save_samples, training_progress
from r1lab.model import CausalLM, load_model, save_model
from r1lab.objective import clipped_surrogate_loss, group_advantages, token_weights, uniform_groups
from r1lab.rewards import RewardResult, RewardWeights, score_completions
from r1lab.runtime import setup_training_process
from r1lab.tasks import DatasetTask, Problem, Task, get_task
from r1lab.tokenizer import Tokenizer, load_tokenizer, render_prompt


@dataclass
class Rollouts:
    """G completions per problem, flattened group by group (completion i belongs to group i // G)."""

    problems: list[Problem]
    prompt_ids: list[list[int]]
    completion_ids: list[list[int]]
    old_logprobs: list[list[float]]
    texts: list[str]
    truncated: list[bool]


@dataclass
class MicroBatch:
    """Sequences grouped by prompt: each distinct prompt appears once, so a group's prompt is computed once."""

    prompts: torch.Tensor  # (U, P) the distinct prompts of this micro-batch, left-padded
    prompt_mask: torch.Tensor  # (U, P) True on real prompt tokens
    rows: torch.Tensor  # (B,) the prompt (index into prompts) each completion continues
    completions: torch.Tensor  # (B, C) completion tokens, right-padded
    completion_mask: torch.Tensor  # (B, C) True on the N real completion tokens (row-major order below)
    old_logp: torch.Tensor  # (N,) sampling log-probs of those N tokens
    advantages: torch.Tensor  # (N,) each token carries its sequence's advantage
    weights: torch.Tensor  # (N,) per-token loss weight implementing the normalisation


def step_seed(seed: int, step: int, purpose: str) -> int:
    """A seed per (run seed, step, purpose): a resumed run draws exactly what an uninterrupted one would."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{step}/{purpose}".encode()).digest()[:4], "little")


# ---------------------------------------------------------------------------------------------------------------
# 1. sample


class PromptStream:
    """The problems for each step, a pure function of (seed, step)."""

    def __init__(self, task: Task, cfg: GRPOConfig):
        self.task, self.cfg = task, cfg
        # A data file is walked through in shuffled epochs; a generator draws fresh problems every step.
        self.pool = task.problems("train", None, cfg.seed) if isinstance(task, DatasetTask) else None

    def batch(self, step: int) -> list[Problem]:
        n = self.cfg.prompts_per_step
        if self.pool is None:
            return self.task.problems("train", n, step_seed(self.cfg.seed, step, "prompts"))
        positions = range(step * n, (step + 1) * n)  # positions in the endless sequence of shuffled epochs
        return [self.pool[self._epoch_order(i // len(self.pool))[i % len(self.pool)]] for i in positions]

    @functools.lru_cache(maxsize=4)
    def _epoch_order(self, epoch: int) -> list[int]:
        return random.Random(step_seed(self.cfg.seed, epoch, "epoch")).sample(range(len(self.pool)), len(self.pool))


def encode_prompt(tokenizer: Tokenizer, problem: Problem, template: str, prefill: str) -> list[int]:
    return tokenizer.encode(render_prompt(tokenizer, problem.prompt, template, prefill))


def sample_rollouts(engine: Engine, problems: list[Problem], cfg: GRPOConfig, seed: int) -> Rollouts:
    G, tok = cfg.samples_per_prompt, engine.tokenizer
    prompts = [encode_prompt(tok, p, cfg.template, cfg.prefill) for p in problems]
    samples = engine.generate(prompts, num_samples=G, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                              top_p=cfg.top_p, top_k=cfg.top_k, seed=seed, suppress_eos=cfg.suppress_eos)
    return Rollouts(problems=[problems[s.prompt_index] for s in samples],
                    prompt_ids=[prompts[s.prompt_index] for s in samples],
                    completion_ids=[s.token_ids for s in samples], old_logprobs=[s.logprobs for s in samples],
                    texts=[s.text for s in samples], truncated=[s.finish_reason == "length" for s in samples])


# ---------------------------------------------------------------------------------------------------------------
# 2. score


def score_rollouts(task: Task, rollouts: Rollouts, cfg: GRPOConfig, seed: int) -> tuple[torch.Tensor, RewardResult]:
    result = score_completions(task, rollouts.problems, rollouts.texts,
                               RewardWeights(cfg.accuracy_weight, cfg.format_weight, cfg.language_weight, cfg.language,
                                             tuple(cfg.reward_functions.items())),
                               cfg.reward_timeout_s, response_prefix=cfg.prefill)
    rewards = torch.tensor(result.total, dtype=torch.float32)
    if cfg.control == "random-reward":
        # The control: the same rewards handed to random completions. Same mean and spread, no signal.
        rewards = rewards[torch.randperm(len(rewards), generator=torch.Generator().manual_seed(seed))]
    return rewards, result


# ---------------------------------------------------------------------------------------------------------------
# 4. update


def make_micro_batches(rollouts: Rollouts, advantages: torch.Tensor, keep: torch.Tensor, cfg: GRPOConfig,
                       pad_id: int, device) -> list[MicroBatch]:
    rows = keep.nonzero().squeeze(-1)
    lengths = torch.tensor([len(rollouts.completion_ids[i]) for i in rows.tolist()])
    seq_weights = token_weights(lengths, cfg.loss_norm, cfg.max_new_tokens)  # normalised over every kept sequence
    if cfg.skip_zero_advantage and cfg.kl_coef == 0:
        # A zero advantage gives its tokens exactly zero gradient (without a KL term), so those sequences, often most
        # of a batch late in training, skip the forward and backward passes. The update is the same.
        trained = advantages[rows] != 0
        rows, lengths, seq_weights = rows[trained], lengths[trained], seq_weights[trained]
    rows = rows.tolist()
    batches = []
    for start in range(0, len(rows), cfg.micro_batch_size):
        chunk = rows[start : start + cfg.micro_batch_size]
        per_seq = lengths[start : start + len(chunk)]
        prompts, prompt_mask, prompt_of = _distinct_prompts([rollouts.prompt_ids[i] for i in chunk], pad_id)
        completions, completion_mask = _right_padded([rollouts.completion_ids[i] for i in chunk], pad_id)
        old = torch.tensor([lp for i in chunk for lp in rollouts.old_logprobs[i]])
        batches.append(MicroBatch(prompts.to(device), prompt_mask.to(device), prompt_of.to(device),
                                  completions.to(device), completion_mask.to(device), old.to(device),
                                  advantages[chunk].repeat_interleave(per_seq).to(device),
                                  seq_weights[start : start + len(chunk)].repeat_interleave(per_seq).to(device)))
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


def _right_padded(seqs: list[list[int]], pad_id: int):
    ids = torch.full((len(seqs), max(map(len, seqs))), pad_id, dtype=torch.long)
    mask = torch.zeros(ids.shape, dtype=torch.bool)
    for r, seq in enumerate(seqs):
        ids[r, : len(seq)] = torch.tensor(seq)
        mask[r, : len(seq)] = True
    return ids, mask


def completion_logprobs(model: CausalLM, mb: MicroBatch, temperature: float, with_entropy: bool = False,
                        chunk_bytes: int = 16 << 20, recompute_logits: bool = False):
    """Log-probs (N,) of the N completion tokens under softmax(logits / temperature), the sampling distribution.

    Logits are computed only where a completion token is predicted (prompt and padding never reach the vocabulary
    projection), and in chunks of tokens of at most chunk_bytes each: allocations that size are recycled by the C
    allocator, while one (N, V) block would be mapped and page-faulted afresh every step. With recompute_logits,
    backward recomputes each chunk's logits instead of keeping them: the memory for logits is then one chunk, not
    N x V floats (what a 150k-token vocabulary needs on a GPU), for one more vocabulary projection.
    """
    hidden = model.completion_hidden_states(mb.prompts, mb.prompt_mask, mb.rows, mb.completions,
                                            mb.completion_mask)[mb.completion_mask]  # (N, D)
    targets = mb.completions[mb.completion_mask]  # (N,)
    rows = max(1, chunk_bytes // (4 * model.config.vocab_size))
    logps, entropies = [], []
    for start in range(0, len(targets), rows):
        h, t = hidden[start : start + rows], targets[start : start + rows]
        want_entropy = with_entropy and not entropies  # a metric: one chunk of tokens estimates it well enough
        if recompute_logits and torch.is_grad_enabled():
            logps.append(torch.utils.checkpoint.checkpoint(_token_logprobs, model.lm_head, h, t, temperature,
                                                           use_reentrant=False))
            if want_entropy:
                with torch.no_grad():
                    entropies.append(_entropy(_scaled_log_softmax(model.lm_head, h, temperature)))
            continue
        logp_all = _scaled_log_softmax(model.lm_head, h, temperature)
        logps.append(logp_all.gather(-1, t[:, None]).squeeze(-1))
        if want_entropy:
            with torch.no_grad():
                entropies.append(_entropy(logp_all))
    return torch.cat(logps), torch.cat(entropies) if with_entropy else None


def _scaled_log_softmax(lm_head, hidden: torch.Tensor, temperature: float) -> torch.Tensor:
    logits = lm_head(hidden).float()  # (n, V)
    return torch.log_softmax(logits / temperature if temperature != 1.0 else logits, -1)


def _token_logprobs(lm_head, hidden: torch.Tensor, targets: torch.Tensor, temperature: float) -> torch.Tensor:
    return _scaled_log_softmax(lm_head, hidden, temperature).gather(-1, targets[:, None]).squeeze(-1)


def _entropy(logp_all: torch.Tensor) -> torch.Tensor:
    return -(logp_all.exp() * logp_all).sum(-1)


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def training_precision(cfg: GRPOConfig, device: torch.device):
    """bf16 autocast for the training forward passes when cfg.dtype is bfloat16 (the weights stay float32)."""
    if cfg.dtype == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=DTYPES[cfg.dtype])


def rollout_policy(model: CausalLM, cfg: GRPOConfig) -> CausalLM:
    """The weights the engine samples from: the policy itself in float32; in bfloat16 a bf16 copy of the float32
    master weights, half the bytes to read per decode step, kept equal to them by sync_rollout_policy."""
    if cfg.dtype == "float32":
        return model
    return copy.deepcopy(model).to(DTYPES[cfg.dtype]).requires_grad_(False).eval()


@torch.no_grad()
def sync_rollout_policy(rollout: CausalLM, model: CausalLM) -> None:
    if rollout is not model:  # parameters() lists a tied embedding once in both, in the same order
        for r, p in zip(rollout.parameters(), model.parameters()):
            r.copy_(p)


def update_policy(model: CausalLM, ref_model: CausalLM | None, optimizer, batches: list[MicroBatch],
                  cfg: GRPOConfig) -> dict:
    """updates_per_batch optimizer steps over the rollouts; a non-finite loss or gradient skips the step."""
    totals = {"loss": 0.0, "clipped": 0.0, "kl": 0.0, "entropy": 0.0, "entropy_tokens": 0, "tokens": 0.0,
              "grad_norm": 0.0, "skipped": 0, "logp_diff_sum": 0.0, "logp_diff_max": 0.0, "logp_diff_tokens": 0}
    for update in range(cfg.updates_per_batch):
        optimizer.zero_grad(set_to_none=True)
        finite = True
        for mb in batches:
            with training_precision(cfg, mb.completions.device):
                logp, entropy = completion_logprobs(model, mb, cfg.temperature, with_entropy=update == 0,
                                                    recompute_logits=cfg.recompute_logits)
            # With a single update the sampling policy is the current one, so detach() gives the exact ratio of 1;
            # with more, the engine's sampling log-probs (same weights, same process) are the old policy.
            old = logp.detach() if cfg.updates_per_batch == 1 else mb.old_logp
            ref = None
            if ref_model is not None:
                with torch.no_grad(), training_precision(cfg, mb.completions.device):
                    ref = completion_logprobs(ref_model, mb, cfg.temperature)[0]
            token_loss, clipped, kl = clipped_surrogate_loss(logp, old, mb.advantages, cfg.clip_low, cfg.clip_high,
                                                             ref, cfg.kl_coef)
            loss = (token_loss * mb.weights).sum()
            if not torch.isfinite(loss):
                finite = False
                break
            loss.backward()
            totals["loss"] += loss.item()
            totals["clipped"] += clipped.float().sum().item()
            totals["tokens"] += len(logp)
            if kl is not None:
                totals["kl"] += kl.detach().sum().item()
            if entropy is not None:
                totals["entropy"] += entropy.sum().item()
                totals["entropy_tokens"] += len(entropy)
            if update == 0 and len(logp):  # sampler vs trainer on the same weights: only precision can differ
                diff = (logp.detach() - mb.old_logp).abs()
                totals["logp_diff_sum"] += diff.sum().item()
                totals["logp_diff_max"] = max(totals["logp_diff_max"], diff.max().item())
                totals["logp_diff_tokens"] += len(diff)
        if finite and not batches:  # every sequence had zero advantage: a zero gradient, and the optimizer still steps
            for p in model.parameters():
                p.grad = torch.zeros_like(p)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm) if finite else torch.tensor(float("nan"))
        if not finite or not torch.isfinite(grad_norm):
            optimizer.zero_grad(set_to_none=True)  # a poisoned step is dropped, the weights stay as they were
            totals["skipped"] += 1
            continue
        totals["grad_norm"] += grad_norm.item()
        optimizer.step()
    tokens, updates = max(totals["tokens"], 1.0), cfg.updates_per_batch
    return {"loss": totals["loss"] / updates, "clip_fraction": totals["clipped"] / tokens,
            "kl": totals["kl"] / tokens if ref_model is not None else None,
            "entropy": totals["entropy"] / totals["entropy_tokens"] if totals["entropy_tokens"] else None,
            "grad_norm": totals["grad_norm"] / updates, "skipped_nonfinite": totals["skipped"],
            **_logp_diff(totals)}


def _logp_diff(totals: dict) -> dict:
    """Mean and max |training log-prob - sampling log-prob| of the trained tokens, before any update: the
    mismatch that biases the importance ratio when sampler and trainer disagree (0 up to rounding in float32)."""
    if not totals["logp_diff_tokens"]:
        return {}
    return {"logprob_diff/mean": totals["logp_diff_sum"] / totals["logp_diff_tokens"],
            "logprob_diff/max": totals["logp_diff_max"]}


# ---------------------------------------------------------------------------------------------------------------
# the loop


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def load_policy(path: str, device: torch.device, dtype: str = "float32") -> tuple[CausalLM, Tokenizer]:
    """A model directory's model (weights in dtype: float32 or bfloat16) and tokenizer, with its stop ids."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    model = load_model(path, device=device, dtype=DTYPES[dtype])
    tokenizer = load_tokenizer(path)
    tokenizer.add_eos_ids(model.config.eos_token_id)
    if not tokenizer.eos_ids:
        raise ValueError(f"{path}: no end-of-text token in tokenizer_config.json or config.json")
    return model, tokenizer


def heldout_eval(engine: Engine, task: Task, problems: list[Problem], cfg: GRPOConfig, step: int) -> EvalResult:
    tok = engine.tokenizer
    return evaluate(engine, task, problems, lambda p: encode_prompt(tok, p, cfg.template, cfg.prefill),
                    k=cfg.eval_samples, temperature=cfg.eval_temperature, top_p=cfg.eval_top_p,
                    max_new_tokens=cfg.max_new_tokens, seed=step_seed(cfg.seed, 0, "eval"),
                    response_prefix=cfg.prefill, timeout_s=cfg.reward_timeout_s)


def log_heldout(logger: MetricsLogger, run: Path, step: int, result: EvalResult) -> None:
    logger.log_eval(step, "heldout", result.to_dict())
    save_json(run / "eval" / f"step_{step:06d}.json", {"heldout": result})  # with every completion, for reading


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
    return metrics


def sample_records(rollouts: Rollouts, rewards, result: RewardResult, n: int) -> list[dict]:
    return [{"prompt": rollouts.problems[i].prompt, "reference": rollouts.problems[i].answer,
             "completion": rollouts.texts[i], "reward": rewards[i].item(), "answer": result.answers[i],
             "correct": result.correct[i], "components": {k: v[i] for k, v in result.components.items()}}
            for i in range(min(n, len(rollouts.texts)))]


def train(cfg: GRPOConfig, log=print) -> Path:
    """Run GRPO; returns the directory of the final Hugging Face-format model."""
    cfg.check()
    setup_training_process(cfg.threads)
    torch.manual_seed(cfg.seed)
    run, device = Path(cfg.out), pick_device(cfg.device)
    task = get_task(cfg.task, **cfg.task_options)  # a malformed data file fails here, before anything is loaded
    model, tokenizer = load_policy(cfg.model, device)
    ref_model = copy.deepcopy(model).to(DTYPES[cfg.dtype]).requires_grad_(False) if cfg.kl_coef else None
    stream = PromptStream(task, cfg)
    eval_problems = task.problems("test", cfg.eval_problems, cfg.seed + 1) if cfg.eval_every else []
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.99), weight_decay=cfg.weight_decay)
    start = 0
    if cfg.resume and (ckpt := latest_checkpoint(run)):
        start = load_checkpoint(ckpt, model, optimizer)
        log(f"resumed from {ckpt} (step {start})")
    engine = Engine(rollout_policy(model, cfg), tokenizer)  # after a resume, so that it has the resumed weights
    save_config(cfg, run / "config.yaml")
    log(f"grpo: {cfg.prompts_per_step} prompts x {cfg.samples_per_prompt} samples = "
        f"{cfg.prompts_per_step * cfg.samples_per_prompt} rollouts per step, micro-batches of {cfg.micro_batch_size}, "
        f"{cfg.updates_per_batch} update(s) per batch, {cfg.steps} steps, device {device}")
    step, trained_s = start, 0.0
    with MetricsLogger(run, resume_step=start) as logger, training_progress(cfg.steps, start) as bar:
        for step in range(start, cfg.steps):
            if cfg.eval_every and step % cfg.eval_every == 0:
                log_heldout(logger, run, step, heldout_eval(engine, task, eval_problems, cfg, step))
            metrics = grpo_step(step, model, ref_model, optimizer, engine, task, stream, cfg, run)
            logger.log(step + 1, metrics)
            bar.update(step + 1, metrics)
            if cfg.save_every and (step + 1) % cfg.save_every == 0:
                save_checkpoint(run, step + 1, model, tokenizer, optimizer)
            trained_s += metrics["step_time_s"]  # evaluations and checkpoints do not count against the budget
            if cfg.time_limit_s and trained_s >= cfg.time_limit_s:
                log(f"grpo: time limit of {cfg.time_limit_s:.0f} s of training reached after {step + 1} steps")
                break
        if cfg.eval_every:
            log_heldout(logger, run, step + 1, heldout_eval(engine, task, eval_problems, cfg, step + 1))
    save_model(model, run / "model")
    tokenizer.save(run / "model")
    return run / "model"


def grpo_step(step, model, ref_model, optimizer, engine, task, stream, cfg: GRPOConfig, run: Path) -> dict:
    t0 = time.perf_counter()
    for g in optimizer.param_groups:
        g["lr"] = cfg.lr * min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps else cfg.lr
    rollouts = sample_rollouts(engine, stream.batch(step), cfg, step_seed(cfg.seed, step, "sample"))
    t_sample = time.perf_counter()
    rewards, result = score_rollouts(task, rollouts, cfg, step_seed(cfg.seed, step, "control"))
    advantages = group_advantages(rewards, cfg.samples_per_prompt, cfg.scale_by_std)
    keep = torch.ones(len(rewards), dtype=torch.bool)
    if cfg.drop_uniform_groups:
        keep = ~uniform_groups(rewards, cfg.samples_per_prompt).repeat_interleave(cfg.samples_per_prompt)
    update = {"skipped_nonfinite": 0}
    if keep.any():
        batches = make_micro_batches(rollouts, advantages, keep, cfg, engine.tokenizer.pad_id, model.lm_head.weight.device)
        update = update_policy(model, ref_model, optimizer, batches, cfg)
        sync_rollout_policy(engine.model, model)
    elapsed = time.perf_counter() - t0
    metrics = step_metrics(rewards, result, rollouts, cfg, update)
    metrics.update({"lr": optimizer.param_groups[0]["lr"], "step_time_s": elapsed,
                    "rollout_time_s": t_sample - t0, "tokens_per_s": metrics["completion_tokens"] / elapsed})
    if cfg.samples_every and step % cfg.samples_every == 0:
        save_samples(run, step, sample_records(rollouts, rewards, result, 2 * cfg.samples_per_prompt))
    if metrics["skipped_nonfinite"]:
        print(f"step {step + 1}: non-finite loss or gradient, update skipped")
    return metrics
