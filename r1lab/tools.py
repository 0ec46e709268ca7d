"""Tool calls inside rollouts: `r1lab grpo --tools python` (and eval, sample with the same settings).

When the model closes a tool block (`<python>...</python>` by default), that rollout pauses: the block's code runs
in the code sandbox (r1lab/sandbox.py: a fresh process forked by a pre-started sandbox, time and memory
limits), what it printed (cut to
tool_output_chars, with a marker) is appended as `<output>...</output>`, and generation continues from there. The
tool-output tokens are seen by the model but are not its own: they carry no sampling log-prob and are never
trained on (ToolSample.model_mask, used by GRPO's loss). A rollout makes at most max_tool_calls calls (a block
closed past the limit ends it, finish_reason "tool_limit"), and all its tokens, the tools' included, fit in
max_new_tokens.

generate_with_tools drives Engine.generate turn by turn: turn 0 samples every rollout with the close tag as a stop
string; each later turn continues the rollouts that stopped on it, each as its own prompt (prompt + completion so
far) with a seed drawn from (its prompt's seed, its sample index, the turn), so a rollout's tokens do not depend on
what else is in the batch.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable

from r1lab.policy import step_seed
from r1lab.sandbox import ProgramResult, run_program_pooled

TOOLS = ("", "python")  # "" = no tools


@dataclass(frozen=True)
class ToolSpec:
    """The tool of a rollout: its tags, and the limits of one call and of a rollout's calls."""

    tag: str = "python"  # the model writes <tag>code</tag>
    output_tag: str = "output"  # and reads <output_tag>what it printed</output_tag>
    max_calls: int = 4
    timeout_s: float = 2.0
    memory_mb: int = 256
    output_chars: int = 512

    @property
    def open(self) -> str:
        return f"<{self.tag}>"

    @property
    def close(self) -> str:
        return f"</{self.tag}>"

    @classmethod
    def of(cls, cfg: Any) -> ToolSpec | None:
        """The spec a command's settings ask for (tools, tool_tag, ..., r1lab/config.py), None without tools."""
        if not getattr(cfg, "tools", ""):
            return None
        return cls(cfg.tool_tag, cfg.tool_output_tag, cfg.max_tool_calls, cfg.tool_timeout_s, cfg.tool_memory_mb,
                   cfg.tool_output_chars)


@dataclass
class ToolSample:
    """A rollout with tool calls; the fields of engine.Sample (so that scorers and records read either), and more."""

    prompt_index: int
    token_ids: list[int]  # the model's tokens and the tool outputs' tokens, in order
    text: str  # the completion as the model saw it, tool outputs included (end-of-text dropped)
    logprobs: list[float]  # the sampling log-prob of each model token; 0.0 on tool-output tokens (never used)
    finish_reason: str  # "stop", "length" (max_new_tokens reached, tool outputs included) or "tool_limit"
    model_mask: list[bool] = field(default_factory=list)  # True on the model's tokens, False on tool output
    calls: int = 0  # tool blocks the model closed
    failures: int = 0  # calls that raised, timed out, exceeded a limit or had no opening tag


Runner = Callable[[str, ToolSpec], ProgramResult]


def run_in_sandbox(code: str, spec: ToolSpec) -> ProgramResult:
    """One call, through the sandbox's fork servers (a few milliseconds, not a process start-up per call)."""
    return run_program_pooled(code, timeout_s=spec.timeout_s, memory_mb=spec.memory_mb,
                       max_output_bytes=4 * spec.output_chars + 64)


def block_code(turn_text: str, spec: ToolSpec) -> str | None:
    """The code of the block a turn ends with (turn_text ends with the close tag), or None without an opening tag."""
    body = turn_text[: len(turn_text) - len(spec.close)]
    start = body.rfind(spec.open)
    return None if start < 0 else body[start + len(spec.open) :]


def output_text(result: ProgramResult | None, spec: ToolSpec) -> str:
    """The <output>...</output> block the model reads after a call: what the code printed, cut to output_chars with
    a marker, and why it failed when it did (None: the block had no opening tag)."""
    if result is None:
        return f"<{spec.output_tag}>error: {spec.close} without {spec.open}\n</{spec.output_tag}>"
    printed = result.output
    if len(printed) > spec.output_chars:
        printed = printed[: spec.output_chars] + f"\n[... {len(printed) - spec.output_chars} more characters]\n"
    if result.error and result.error != "raised an exception":  # an exception printed its own last line
        printed += f"error: {result.error}\n"
    return f"<{spec.output_tag}>{printed}</{spec.output_tag}>"


@dataclass
class _Rollout:
    """One rollout while its turns are generated."""

    prompt: list[int]
    seed: int | None
    sample: int
    out: ToolSample
    pending: str | None = None  # the text of the turn that just closed a tool block


def turn_seed(seed: int | None, sample: int, turn: int) -> int | None:
    """The seed of a rollout's turn >= 1: a pure function of its prompt's seed, its sample index and the turn."""
    return None if seed is None else step_seed(seed, turn, f"tool-turn/{sample}")


def generate_with_tools(engine: Any, prompt_ids: list[list[int]], spec: ToolSpec, *, num_samples: int = 1,
                        max_new_tokens: int = 128, seed: int | list[int | None] | None = None,
                        stop_strings: tuple[str, ...] = (), runner: Runner = run_in_sandbox,
                        **sampling: Any) -> list[ToolSample]:
    """num_samples rollouts per prompt (prompt-major, like Engine.generate), with tool calls: see the module's
    docstring. seed: one per prompt, or an int from which each prompt's is drawn (None: unseeded); sampling:
    Engine.generate's temperature, top_p, top_k, suppress_eos, max_rows."""
    seeds = list(seed) if isinstance(seed, (list, tuple)) else \
        [None if seed is None else step_seed(seed, i, "tool-prompt") for i in range(len(prompt_ids))]
    stops = (spec.close, *stop_strings)
    first = engine.generate(prompt_ids, num_samples=num_samples, max_new_tokens=max_new_tokens, seed=seeds,
                            stop_strings=stops, **sampling)
    rollouts = [_Rollout(prompt_ids[s.prompt_index], seeds[s.prompt_index], i % num_samples,
                         ToolSample(s.prompt_index, [], "", [], s.finish_reason)) for i, s in enumerate(first)]
    for r, s in zip(rollouts, first):
        _add_turn(r, s, spec, engine.tokenizer.eos_ids)
    turn = 1
    while pending := [r for r in rollouts if r.pending is not None]:
        _run_calls(pending, spec, runner, engine.tokenizer, max_new_tokens)
        going = [r for r in pending if r.pending is not None]
        if going:
            samples = engine.generate([r.prompt + r.out.token_ids for r in going], num_samples=1,
                                      max_new_tokens=[max_new_tokens - len(r.out.token_ids) for r in going],
                                      seed=[turn_seed(r.seed, r.sample, turn) for r in going], stop_strings=stops,
                                      **sampling)
            for r, s in zip(going, samples):
                r.pending = None
                _add_turn(r, s, spec, engine.tokenizer.eos_ids)
        turn += 1
    return [r.out for r in rollouts]


def _add_turn(r: _Rollout, sample: Any, spec: ToolSpec, eos_ids: set[int]) -> None:
    """Append a turn's model tokens; mark the rollout pending when the turn closed a tool block."""
    out = r.out
    out.token_ids += sample.token_ids
    out.logprobs += sample.logprobs
    out.model_mask += [True] * len(sample.token_ids)
    out.text += sample.text
    out.finish_reason = sample.finish_reason
    closed = sample.finish_reason == "stop" and sample.text.endswith(spec.close)
    if closed and not (sample.token_ids and sample.token_ids[-1] in eos_ids):
        r.pending = sample.text


def _run_calls(pending: list[_Rollout], spec: ToolSpec, runner: Runner, tokenizer: Any, max_new_tokens: int) -> None:
    """Run the pending rollouts' blocks (in parallel: each is its own process) and append their outputs; a
    rollout past its call limit or out of tokens ends (its pending mark cleared)."""
    for r in pending:
        r.out.calls += 1
    allowed = [r for r in pending if r.out.calls <= spec.max_calls]
    codes = [block_code(r.pending, spec) for r in allowed]
    with ThreadPoolExecutor(max_workers=max(1, min(len(allowed), os.cpu_count() or 1))) as pool:
        results = list(pool.map(lambda code: None if code is None else runner(code, spec), codes))
    for r in pending:
        if r.out.calls > spec.max_calls:
            r.out.failures += 1
            r.out.finish_reason, r.pending = "tool_limit", None
    for r, result in zip(allowed, results):
        r.out.failures += result is None or not result.ok
        text = output_text(result, spec)
        ids = tokenizer.encode(text, add_special_tokens=False)
        room = max_new_tokens - len(r.out.token_ids)
        if len(ids) >= room:  # the output fills the budget: the rollout ends there, cut by length
            ids, text = ids[:room], tokenizer.decode(ids[:room])
            r.out.finish_reason, r.pending = "length", None
        r.out.token_ids += ids
        r.out.logprobs += [0.0] * len(ids)
        r.out.model_mask += [False] * len(ids)
        r.out.text += text
