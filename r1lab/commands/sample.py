"""Rejection sampling, R1's stage 3: `r1lab sample --model DIR --task NAME_OR_FILE --out data.jsonl`.

k completions per prompt, scored by the task's verifier (the RL reward's scorer), are kept only when correct and
readable (REASONS), as chat rows that `r1lab sft` reads, each with where it came from; a summary counts every
rejection by its first failed check. With --tools python a kept row holds its tool calls and their outputs.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch

from r1lab.config import SampleConfig, save_config
from r1lab.cpu.process import setup_training_process
from r1lab.engine.engine import Engine, Sample
from r1lab.engine.sampling import step_seed
from r1lab.engine.agents import rollout_turns
from r1lab.engine.tools import generate_with_tools
from r1lab.model.loading import check_context, describe_prompts, encode_prompt, load_policy, pick_device
from r1lab.rewards.language import check_target, language_consistency
from r1lab.rewards.rules import RewardResult, score_completions
from r1lab.rewards.tasks import DatasetTask, Problem, Task, get_task
from r1lab.train.checkpoint import STATE_FILE
from r1lab.train.distributed import Silent, join_world
from r1lab.train.metrics import training_progress
from r1lab.train.task_settings import (announce_answer_format, check_settings, scoring_keywords,
                                       start_sandbox)

# The checks in the order they are applied; a rejected completion is counted under the first it fails.
REASONS = ("incorrect", "format", "truncated", "too_short", "too_long", "language", "duplicate", "over_max_per_prompt")


@dataclass
class Filters:
    """The readability checks a verified-correct completion must also pass to be kept (settings: SampleConfig)."""

    min_tokens: int
    max_tokens: int  # 0 = no upper limit
    language: str  # "" = no language filter
    min_language_score: float

    def __post_init__(self) -> None:
        if self.language:
            check_target(self.language)  # an unknown language fails here, before anything is sampled

    @classmethod
    def of(cls, cfg: SampleConfig) -> Filters:
        return cls(cfg.min_tokens, cfg.max_tokens, cfg.language, cfg.min_language_score)

    def reason(self, response: str, n_tokens: int, correct: bool, format_score: float,
               finished: bool = True) -> str | None:
        """Why a completion is rejected (the first failed check of REASONS), or None to keep it. response is the text
        as scored; n_tokens counts the generated tokens but end-of-text; finished: not cut off by max_new_tokens."""
        if not correct:
            return "incorrect"
        if format_score < 1.0:
            return "format"
        if not finished:
            return "truncated"
        if n_tokens < self.min_tokens:
            return "too_short"
        if self.max_tokens and n_tokens > self.max_tokens:
            return "too_long"
        if self.language and language_consistency(response, self.language) < self.min_language_score:
            return "language"
        return None


def pick_problems(task: Task, cfg: SampleConfig) -> list[Problem]:
    """The distinct prompts to sample: a data file's split (or its first `problems`, seeded), or generated ones."""
    if isinstance(task, DatasetTask):
        drawn = task.problems(cfg.split, None, cfg.seed)  # the whole split, shuffled: no cycling into repeats
        drawn = drawn[: cfg.problems] if cfg.problems else drawn
    elif cfg.problems:
        drawn = task.problems(cfg.split, cfg.problems, cfg.seed)
    else:
        raise ValueError(f"task {cfg.task!r} generates its problems: give --problems N (0 means all rows of a file)")
    first: dict[str, Problem] = {}
    for problem in drawn:
        first.setdefault(problem.prompt, problem)  # a repeated prompt would only repeat its completions
    unique = list(first.values())
    if not unique:
        raise ValueError(f"no {cfg.split!r} problems to sample from")
    return unique


def model_step(path: str | Path) -> int | None:
    """The step an r1lab or Hugging Face Trainer checkpoint was saved at; None for a final model or unreadable."""
    path = Path(path)
    try:
        if (path / "trainer_state.json").exists():
            return int(json.loads((path / "trainer_state.json").read_text())["global_step"])
        if (path / STATE_FILE).exists():
            if match := re.fullmatch(r"step_(\d+)", path.name):
                return int(match.group(1))
            # mmap: the optimizer state it also holds can be twice the model's size
            return int(torch.load(path / STATE_FILE, map_location="cpu", weights_only=False, mmap=True)["step"])
    except (KeyError, TypeError, ValueError, OSError, RuntimeError):
        pass  # provenance is best effort: an unreadable step is recorded as unknown
    return None


@dataclass
class Tally:
    """What happened to every sampled completion, for the summary."""

    prompts: int = 0
    sampled: int = 0
    kept: int = 0
    prompts_with_kept: int = 0
    correct: int = 0
    rejected: Counter = field(default_factory=Counter)
    scorer_errors: int = 0
    scorer_timeouts: int = 0
    tool_calls: int = 0
    tool_failures: int = 0
    drafted: int = 0  # with speculative decoding: drafted tokens, and those the model accepted
    accepted: int = 0

    @classmethod
    def merged(cls, tallies: list[Tally]) -> Tally:
        """The tally of the whole job, from each rank's."""
        total = cls()
        for t in tallies:
            for f in fields(cls):  # counts, and the Counter of rejections (+= adds Counters key by key)
                setattr(total, f.name, getattr(total, f.name) + getattr(t, f.name))
        return total

    def summary(self) -> dict:
        return {"prompts": self.prompts, "sampled": self.sampled, "kept": self.kept,
                "kept_share": self.kept / max(1, self.sampled), "prompts_with_kept": self.prompts_with_kept,
                "rejected": {r: self.rejected[r] for r in REASONS}, "scorer_errors": self.scorer_errors,
                "scorer_timeouts": self.scorer_timeouts, "tool_calls": self.tool_calls,
                "tool_failures": self.tool_failures,
                **({"speculative_acceptance": self.accepted / self.drafted} if self.drafted else {})}


def sft_row(problem: Problem, response: str, n: int, result: RewardResult, provenance: dict, system: str = "",
            turns: list[dict] | None = None, **extra) -> dict:
    """One kept completion in the chat format `r1lab sft` reads (with an environment, every turn), plus where it came
    from. An environment's task has no accuracy or format of its own: its correctness and 1.0 stand in."""
    history = problem.messages or [{"role": "user", "content": problem.prompt}]
    if system and not any(m["role"] == "system" for m in history):
        history = [{"role": "system", "content": system}, *history]
    return {"messages": [*history, *(turns or [{"role": "assistant", "content": response}])], **provenance,
            "reward": result.total[n], "accuracy": result.components.get("accuracy", result.correct)[n] * 1.0,
            "format": _format(result)[n], "answer": result.answers[n], "reference": problem.answer,
            **extra}


def _format(result: RewardResult) -> list[float]:
    return result.components.get("format", [1.0] * len(result.total))


def judge_prompt(problem: Problem, samples: list[Sample], first: int, result: RewardResult, cfg: SampleConfig,
                 filters: Filters, eos_ids: set[int], tally: Tally, prefix: str) -> list[tuple[int, str, int]]:
    """(sample index, response, tokens) of the completions kept for one prompt; samples[first + j] is its j-th.
    prefix: the start of the response that the prompt writes, read by the filters as by the scorer."""
    kept: list[tuple[int, str, int]] = []
    for j in range(cfg.samples):
        n = first + j
        sample = samples[n]
        response = cfg.prefill + sample.text
        n_tokens = sum(t not in eos_ids for t in sample.token_ids)
        reason = filters.reason(prefix + sample.text, n_tokens, result.correct[n],
                                _format(result)[n], finished=sample.finish_reason == "stop")
        if reason is None and any(response.strip() == r.strip() for _, r, _ in kept):
            reason = "duplicate"
        if reason is None and cfg.max_per_prompt and len(kept) >= cfg.max_per_prompt:
            reason = "over_max_per_prompt"
        if reason is None:
            kept.append((j, response, n_tokens))
        else:
            tally.rejected[reason] += 1
    return kept


def sample_chunk(engine: Engine, task: Task, chunk: list[Problem], offset: int, cfg: SampleConfig,
                 filters: Filters, provenance: dict, tally: Tally) -> list[dict]:
    """One generate call for a chunk of prompts (k samples each), scored and filtered; the SFT rows kept."""
    k, tok = cfg.samples, engine.tokenizer
    # a seed per prompt index: a kept row's seed and sample index reproduce it whatever the chunking
    seeds = [step_seed(cfg.seed, offset + i, "sample") for i in range(len(chunk))]
    prompts = [encode_prompt(tok, p, cfg.template, cfg.prefill, cfg.system) for p in chunk]
    sampling = dict(num_samples=k, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                    seed=seeds)
    tools = rollout_turns(cfg, task, chunk, tok)
    samples = generate_with_tools(engine, prompts, tools, **sampling) if tools else engine.generate(prompts, **sampling)
    tally.drafted += sum(s.drafted for s in samples)
    tally.accepted += sum(s.accepted for s in samples)
    if tools:
        tally.tool_calls += sum(s.calls for s in samples)
        tally.tool_failures += sum(s.failures for s in samples)
    keywords = scoring_keywords(cfg, tok, task)
    result = score_completions(task, [p for p in chunk for _ in range(k)],
                               [getattr(s, "messages", None) or s.text for s in samples],
                               timeout_s=cfg.reward_timeout_s, **keywords)
    tally.scorer_errors += result.errors
    tally.correct += sum(result.correct)
    tally.scorer_timeouts += result.timeouts
    rows = []
    for i, problem in enumerate(chunk):
        kept = judge_prompt(problem, samples, i * k, result, cfg, filters, tok.eos_ids, tally,
                            keywords["response_prefix"])
        tally.prompts_with_kept += bool(kept)
        rows += [sft_row(problem, response, i * k + j, result, provenance, cfg.system, prompt_index=offset + i,
                         sample_index=j, seed=seeds[i], tokens=n_tokens,
                         turns=getattr(samples[i * k + j], "messages", None),
                         **({"tool_calls": samples[i * k + j].calls} if tools else {}))
                 for j, response, n_tokens in kept]
    tally.prompts += len(chunk)
    tally.sampled += len(samples)
    tally.kept += len(rows)
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    tmp.replace(path)  # a run killed while writing leaves no half-written dataset behind


def sample(cfg: SampleConfig, log=print) -> Path:
    """`r1lab sample`: write the kept completions to cfg.out (JSONL) and a summary beside it; returns cfg.out."""
    check_settings(cfg)
    setup_training_process(cfg.threads, cfg.model, cfg.device)
    torch.manual_seed(cfg.seed)
    world, device = join_world(pick_device(cfg.device), cfg.dist_timeout_s)  # torchrun: each rank a share of prompts
    log = log if world.main else Silent().log
    out = Path(cfg.out)
    task = get_task(cfg.task, **cfg.task_options)  # a malformed data file fails here, before the model loads
    start_sandbox(cfg, log)
    problems = pick_problems(task, cfg)
    filters = Filters.of(cfg)
    model, tokenizer = load_policy(cfg.model, device, cfg.dtype, cfg.adapter)
    announce_answer_format(cfg, tokenizer, task, log)
    check_context(model, tokenizer, problems, cfg.template, cfg.prefill, cfg.max_new_tokens, cfg.task, cfg.system)
    engine = Engine(model, tokenizer, speculative=cfg.speculative, speculative_tokens=cfg.speculative_tokens)
    provenance = {"source_model": str(Path(cfg.model).resolve()), "source_step": model_step(cfg.model),
                  "template": cfg.template}
    log(f"sample: {describe_prompts(tokenizer, problems[0], cfg.template, cfg.prefill, cfg.system)}")
    if world.main:
        save_config(cfg, out.with_name(out.stem + ".config.yaml"))
    log(f"sample: {len(problems)} prompts x {cfg.samples} samples from {cfg.model}, "
        f"{cfg.prompts_per_chunk} prompts per generate call" + (f", {world.size} ranks" if world.distributed else ""))
    rows, tally = [], Tally()
    mine = world.share(len(problems))  # every prompt's samples are seeded by its index: the same rows at any N
    chunks = range(mine.start, mine.stop, cfg.prompts_per_chunk)
    with training_progress(len(chunks)) if world.main else Silent() as bar:
        for n, start in enumerate(chunks, 1):
            chunk = problems[start : min(start + cfg.prompts_per_chunk, mine.stop)]
            rows += sample_chunk(engine, task, chunk, start, cfg, filters, provenance, tally)
            bar.update(n, {"accuracy": tally.correct / max(1, tally.sampled)})
    rows, tally = world.concat(rows), Tally.merged(world.gather(tally))
    if not world.main:
        world.barrier()
        return out
    summary = {**tally.summary(), "out": str(out)}
    # the summary first: rows on disk (what marks a distill or pipeline stage done) always have theirs beside them
    out.with_name(out.stem + ".summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    write_jsonl(out, rows)
    if not rows:
        log(f"sample: WARNING: nothing was kept. If the model was trained on another task or task options than "
            f"--task {cfg.task} --task-options {cfg.task_options or '{}'}, pass the ones it learned.")
    log(summary_text(summary))
    world.barrier()  # rank 0 has written: the job may end
    return out


def summary_text(summary: dict) -> str:
    rejected = ", ".join(f"{r} {n}" for r, n in summary["rejected"].items() if n) or "none"
    return (f"sample: {summary['prompts']} prompts, {summary['sampled']} sampled, {summary['kept']} kept "
            f"({100 * summary['kept_share']:.1f}%, from {summary['prompts_with_kept']} prompts); rejected: {rejected}"
            f"; scorer errors {summary['scorer_errors']}, timeouts {summary['scorer_timeouts']} -> {summary['out']}")
