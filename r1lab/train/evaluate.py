"""Evaluation the DeepSeek-R1 way: k sampled completions per problem (never greedy), scored by the training rewards:
pass@1 (mean correctness), cons@k (majority vote), pass@j (Chen et al. 2021's unbiased estimator).
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable, Sequence

from rich.console import Console
from rich.table import Table

from r1lab.config import EvalConfig
from r1lab.cpu.process import setup_training_process
from r1lab.engine.engine import Engine
from r1lab.engine.sampling import step_seed
from r1lab.engine.agents import rollout_turns
from r1lab.engine.tools import ToolSample, ToolSpec, Turns, generate_with_tools
from r1lab.model.loading import check_context, describe_prompts, encode_prompt, load_policy, pick_device
from r1lab.rewards.language import language_consistency
from r1lab.rewards.rules import call_with_timeout, score_completions
from r1lab.rewards.tasks import DatasetTask, Problem, Task, get_task
from r1lab.train.distributed import World, join_world
from r1lab.train.task_settings import announce_answer_format, scoring_keywords, start_sandbox

# A correct answer earns the task's full accuracy score; partial credit (if a task gives any) does not count.
_FULL_CREDIT = 1.0 - 1e-6


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct: 1 - C(n-c, k) / C(n, k)."""
    if n < 1 or k < 1 or c < 0 or c > n:
        raise ValueError(f"pass_at_k needs n >= 1, k >= 1 and 0 <= c <= n (got n={n}, c={c}, k={k})")
    if k > n:
        raise ValueError(f"pass@{k} needs at least {k} samples per problem, got {n}")
    if n - c < k:
        return 1.0  # every k-subset contains a correct sample
    # C(n-c,k)/C(n,k) = prod_{i=n-c+1}^{n} (1 - k/i): no huge binomials, no overflow for large n.
    all_wrong = 1.0
    for i in range(n - c + 1, n + 1):
        all_wrong *= 1.0 - k / i
    return 1.0 - all_wrong


def majority_vote(answers: Sequence[str | None]) -> str | None:
    """The most common non-None answer; ties go to the one seen first."""
    counts = Counter(a for a in answers if a is not None)
    if not counts:
        return None
    best = max(counts.values())
    return next(a for a in answers if a is not None and counts[a] == best)


def pass_ks(k: int) -> list[int]:
    """The j reported as pass@j: powers of two below k, and k itself."""
    return [2**i for i in range(max(k - 1, 0).bit_length())] + [k]


@dataclass
class EvalResult:
    k: int
    n_problems: int
    pass_at: dict[int, float]  # unbiased pass@j for j in pass_ks(k)
    cons_at_k: float
    format_rate: float  # share of samples with format reward 1
    mean_length: float  # completion tokens per sample
    truncation_rate: float = 0.0  # share of samples that hit max_new_tokens
    language_consistency: float = 0.0  # mean share of chain-of-thought words in the target language (readability)
    records: list[dict] = field(default_factory=list)  # per problem: prompt, reference, the k samples
    tool_calls: float | None = None  # with tools: calls per sample
    tool_failure_rate: float | None = None  # with tools: the share of calls that failed
    tokens_per_s: float | None = None  # completion tokens generated per second of generation (summed over ranks)
    acceptance: float | None = None  # speculative decoding: the share of drafted tokens accepted

    @property
    def pass_at_1(self) -> float:
        return self.pass_at[1]

    def to_dict(self, include_records: bool = False) -> dict[str, Any]:
        out: dict[str, Any] = {"pass@1": self.pass_at[1], f"cons@{self.k}": self.cons_at_k}
        out.update({f"pass@{j}": v for j, v in sorted(self.pass_at.items()) if j != 1})
        out.update(format_rate=self.format_rate, mean_length=self.mean_length, truncation_rate=self.truncation_rate,
                   language_consistency=self.language_consistency, k=self.k, n_problems=self.n_problems)
        if self.tool_calls is not None:
            out.update(tool_calls=self.tool_calls, tool_failure_rate=self.tool_failure_rate)
        out.update({k: v for k, v in (("tokens_per_s", self.tokens_per_s), ("acceptance", self.acceptance))
                    if v is not None})
        if include_records:
            out["records"] = self.records
        return out


def run_eval(cfg: EvalConfig) -> Path:
    """`r1lab eval`: evaluate a model directory, print a table and save JSON."""
    setup_training_process(cfg.threads, cfg.model, cfg.device)
    world, device = join_world(pick_device(cfg.device), cfg.dist_timeout_s)  # torchrun: each rank a share
    task = get_task(cfg.task, **cfg.task_options)  # a malformed data file fails here, before the model loads
    start_sandbox(cfg, print if world.main else lambda line: None)
    model, tokenizer = load_policy(cfg.model, device, cfg.dtype, cfg.adapter)
    problems = heldout_problems(task, cfg.split, cfg.problems, cfg.seed)
    announce_answer_format(cfg, tokenizer, task, print if world.main else lambda _: None)
    check_context(model, tokenizer, problems, cfg.template, cfg.prefill, cfg.max_new_tokens, cfg.task, cfg.system)
    if world.main:
        print(f"eval: {describe_prompts(tokenizer, problems[0], cfg.template, cfg.prefill, cfg.system)}")
    engine = Engine(model.eval(), tokenizer, speculative=cfg.speculative, speculative_tokens=cfg.speculative_tokens)
    result = evaluate_policy(engine, task, cfg, problems, world=world)
    path = results_path(cfg)
    if world.main:
        print_table({Path(cfg.model).name or cfg.model: result}, f"{cfg.task} ({cfg.split}, {result.n_problems} problems)")
        save_json(path, {cfg.split: result})
    world.barrier()
    return path


def results_path(cfg: EvalConfig) -> Path:
    """--out; else RUN/eval.json for RUN/model, else eval-NAME.json here (never inside the model directory)."""
    if cfg.out:
        return Path(cfg.out)
    model = Path(cfg.model)
    if model.name == "model" and any((model.parent / f).exists() for f in ("metrics.jsonl", "config.yaml")):
        return model.parent / "eval.json"
    return Path(f"eval-{model.resolve().name}.json")


def heldout_problems(task: Task, split: str, n: int, seed: int) -> list[Problem]:
    """The held-out set: n distinct problems of the split, drawn with seed + 1 (a data file's: n 0 for every row)."""
    if isinstance(task, DatasetTask):
        return task.problems(split, None, seed + 1)[: n if n > 0 else None]
    if split == "all" or n <= 0:
        raise ValueError(f"task {task.name!r} generates its problems: give --problems N (N >= 1) and --split test or "
                         "train; --split all and --problems 0 (every row) are for data files")
    return task.problems(split, n, seed + 1)


def evaluate_policy(engine: Any, task: Task, ec: EvalConfig, problems: Sequence[Problem] | None = None,
                    world: World = World()) -> EvalResult:
    """The paper's protocol as ec sets it, on the held-out set unless problems are given."""
    if problems is None:
        problems = heldout_problems(task, ec.split, ec.problems, ec.seed)
    tok = engine.tokenizer
    return evaluate(engine, task, problems, lambda p: encode_prompt(tok, p, ec.template, ec.prefill, ec.system), k=ec.samples,
                    temperature=ec.temperature, top_p=ec.top_p, max_new_tokens=ec.max_new_tokens, seed=ec.seed,
                    batch_prompts=ec.prompts_per_chunk, timeout_s=ec.reward_timeout_s, language=ec.language, world=world,
                    tools=lambda chunk: rollout_turns(ec, task, chunk, tok),
                    **scoring_keywords(ec, tok, task))


def evaluate(engine: Any, task: Any, problems: Sequence[Problem], encode_prompt: Callable[[Problem], list[int]], *,
             k: int = 8, temperature: float = 0.6, top_p: float = 0.95, max_new_tokens: int = 128,
             seed: int | None = 0, batch_prompts: int = 64, response_prefix: str = "", timeout_s: float = 5.0,
             scorer: Callable[..., Any] | None = None, language: str = "en", world: World = World(),
             tools: ToolSpec | Callable[[list[Problem]], Turns | None] | None = None,
             answer_format: str = "tags") -> EvalResult:
    """Sample k completions per problem (with tools: a ToolSpec or a function of a batch's problems), score them
    with `scorer` (default score_completions) and summarise. Each rank takes a share; samples are seeded by
    (seed, problem index), so the figures equal one process's exactly."""
    scorer = scorer or partial(score_completions, answer_format=answer_format)
    if not problems:
        raise ValueError("evaluate() got no problems")
    if k < 1 or batch_prompts < 1:
        raise ValueError(f"k and batch_prompts must be >= 1 (got k={k}, batch_prompts={batch_prompts})")
    records: list[dict] = []
    generated, generation_s = 0, 0.0
    drafts = dict(getattr(engine, "speculative_counts", {}))  # an engine's counts before (tests pass fakes)
    mine = world.share(len(problems))
    for start in range(mine.start, mine.stop, batch_prompts):
        indices = range(start, min(start + batch_prompts, mine.stop))
        chunk = [problems[i] for i in indices]
        seeds = None if seed is None else [step_seed(seed, i, "eval") for i in indices]
        sampling = dict(num_samples=k, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seeds)
        prompts = [encode_prompt(p) for p in chunk]
        t0 = time.perf_counter()
        turns = tools(chunk) if callable(tools) else tools
        samples = generate_with_tools(engine, prompts, turns, **sampling) if turns else \
            engine.generate(prompts, **sampling)
        generation_s += time.perf_counter() - t0
        generated += sum(len(s.token_ids) for s in samples)
        if len(samples) != len(chunk) * k:
            raise RuntimeError(f"engine returned {len(samples)} samples for {len(chunk)} prompts x {k}")
        repeated = [p for p in chunk for _ in range(k)]
        reward = scorer(task, repeated, [getattr(s, "messages", None) or s.text for s in samples], timeout_s=timeout_s,
                        response_prefix=response_prefix)
        for i, problem in enumerate(chunk):
            records.append(_problem_record(task, problem, samples, reward, slice(i * k, (i + 1) * k),
                                           response_prefix, language, timeout_s))
    result = summarise(world.concat(records), k)
    # each rank's throughput, summed: the ranks generate at the same time
    result.tokens_per_s = world.sum([generated / generation_s if generation_s > 0 else 0.0])[0]
    if getattr(engine, "speculative", "none") != "none":
        drafted, accepted = world.sum([engine.speculative_counts[k] - drafts[k] for k in ("drafted", "accepted")])
        result.acceptance = accepted / max(drafted, 1)
    return result


def _problem_record(task: Any, problem: Problem, samples: list, reward: Any, sl: slice, response_prefix: str,
                    language: str, timeout_s: float) -> dict:
    answers = reward.answers[sl]
    canon = [_canonical(task, a, timeout_s) for a in answers]
    vote = majority_vote(canon)
    # the vote is correct when the samples that gave it were: no second call to the verifier
    correct = reward.correct[sl]
    voted_correct = [c for a, c in zip(canon, correct) if a is not None and a == vote]
    return {"prompt": problem.prompt, "reference": problem.answer, "majority": vote,
            "majority_correct": bool(voted_correct) and all(voted_correct),
            "samples": [{"completion": s.text, "answer": a, "correct": bool(c), "format": float(f),
                         "length": len(s.token_ids),
                         "language": language_consistency(response_prefix + s.text, language),
                         "finish_reason": s.finish_reason,
                         **({"tool_calls": s.calls, "tool_failures": s.failures} if isinstance(s, ToolSample) else {})}
                        for s, a, c, f in zip(samples[sl], answers, correct,
                                              reward.components.get("format", [0.0] * len(reward.total))[sl])]}


def _canonical(task: Any, answer: str | None, timeout_s: float) -> str | None:
    """The answer's canonical form for voting, under the scorers' timeout; None (no vote) on a crash or hang."""
    if answer is None:
        return None
    try:
        return call_with_timeout(lambda: task.canonical(answer), timeout_s)
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException:  # a crash, or the timeout (a BaseException, so that a bare `except Exception` can't eat it)
        return None


def summarise(records: list[dict], k: int) -> EvalResult:
    samples = [s for r in records for s in r["samples"]]
    n_correct = [sum(s["correct"] for s in r["samples"]) for r in records]
    pass_at = {j: _mean([pass_at_k(k, c, j) for c in n_correct]) for j in pass_ks(k)}
    calls = [s["tool_calls"] for s in samples if "tool_calls" in s]
    failures = sum(s["tool_failures"] for s in samples if "tool_failures" in s)
    return EvalResult(k=k, n_problems=len(records), pass_at=pass_at,
                      cons_at_k=_mean([float(r["majority_correct"]) for r in records]),
                      format_rate=_mean([float(s["format"] >= _FULL_CREDIT) for s in samples]),
                      mean_length=_mean([s["length"] for s in samples]),
                      truncation_rate=_mean([float(s["finish_reason"] == "length") for s in samples]),
                      language_consistency=_mean([s.get("language", 0.0) for s in samples]), records=records,
                      tool_calls=_mean(calls) if calls else None,
                      tool_failure_rate=failures / sum(calls) if calls and sum(calls) else 0.0 if calls else None)


def _mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs) if xs else 0.0


def _table_rows(d: dict) -> list[tuple[str, float | None]]:
    cons_key = next((key for key in d if key.startswith("cons@")), None)
    pass_k = f"pass@{d['k']}" if "k" in d else max((x for x in d if x.startswith("pass@")), default=None)
    return [("pass@1", d.get("pass@1")), ("cons@k", d.get(cons_key) if cons_key else None),
            ("pass@k", d.get(pass_k) if pass_k else None), ("format rate", d.get("format_rate")),
            ("mean length", d.get("mean_length"))]


def print_table(results: dict[str, EvalResult | dict], title: str, console: Any = None) -> Any:
    """Print one column per named result (e.g. "base", "after RL"); returns the rich Table."""
    dicts = {name: r.to_dict() if isinstance(r, EvalResult) else r for name, r in results.items()}
    ks = {d.get("k") for d in dicts.values()}
    k_label = str(ks.pop()) if len(ks) == 1 and None not in ks else "k"
    table = Table(title=title)
    table.add_column("metric")
    for name in dicts:
        table.add_column(name, justify="right")
    rows = [_table_rows(d) for d in dicts.values()]
    for i, (label, _) in enumerate(rows[0] if rows else []):
        if k_label == "1" and label.endswith("@k"):  # one sample: cons@1 and pass@1 would repeat pass@1
            continue
        cells = ["-" if r[i][1] is None else f"{r[i][1]:.1f}" if label == "mean length" else f"{100 * r[i][1]:.1f}%"
                 for r in rows]
        table.add_row(label.replace("@k", f"@{k_label}"), *cells)
    (console or Console()).print(table)
    return table


def save_json(path: str | Path, results: dict[str, EvalResult | dict], include_records: bool = True) -> Path:
    """Write {name: figures (+ per-problem records)} as indented JSON; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    out = {name: r.to_dict(include_records=include_records) if isinstance(r, EvalResult) else r
           for name, r in results.items()}
    tmp = path.with_name(path.name + ".tmp")
    try:  # whole or not at all: a full disk or a kill leaves the earlier file, never a torn one read as complete
        tmp.write_text(json.dumps(out, indent=2, ensure_ascii=False) + "\n")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
