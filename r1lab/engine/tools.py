"""Tool calls and environment turns inside rollouts: `r1lab grpo --tools python` (and eval, sample, serve, chat).

When the model closes a tool block (`<python>...</python>` by default), its rollout pauses: the code runs in the
sandbox (r1lab/rewards/sandbox/runner.py), what it printed (cut to tool_output_chars) is appended as
`<output>...</output>`, and generation continues. Tool-output tokens are read by the model but never trained on
(ToolSample.model_mask). A rollout makes at most max_tool_calls calls (one more ends it, finish_reason "tool_limit"),
and all its tokens, the tools' included, fit in max_new_tokens.

generate_with_tools drives Engine.generate turn by turn, each turn seeded by (its prompt's seed, its sample index, the
turn), so a rollout's tokens do not depend on its batch-mates; an environment's turns (EnvTurns) run the same loop.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

from r1lab.engine.sampling import step_seed
from r1lab.model.templates import render_conversation
from r1lab.rewards.environments import call_all
from r1lab.rewards.sandbox.runner import ProgramResult, run_program_pooled, sandbox_summary


@dataclass(frozen=True)
class ToolSpec:
    """The tool of a rollout: its tags, and the limits of one call and of a rollout's calls."""

    tag: str = "python"  # the model writes <tag>code</tag>
    output_tag: str = "output"  # and reads <output_tag>what it printed</output_tag>
    max_calls: int = 4
    timeout_s: float = 2.0
    memory_mb: int = 256
    output_chars: int = 512
    sandbox: str = "auto"  # r1lab.rewards.sandbox.runner.SANDBOXES: the boundary the calls run in

    @property
    def open(self) -> str:
        return f"<{self.tag}>"

    @property
    def close(self) -> str:
        return f"</{self.tag}>"

    @classmethod
    def of(cls, cfg: Any) -> ToolSpec | None:
        """The spec a command's settings ask for (tools, tool_tag, ..., r1lab/config/groups.py), None without tools."""
        if not getattr(cfg, "tools", ""):
            return None
        return cls(cfg.tool_tag, cfg.tool_output_tag, cfg.max_tool_calls, cfg.tool_timeout_s, cfg.tool_memory_mb,
                   cfg.tool_output_chars, cfg.sandbox)


@dataclass
class ToolSample:
    """A rollout with tool calls; the fields of engine.Sample (so that scorers and records read either), and more."""

    prompt_index: int
    token_ids: list[int]  # the model's tokens and the tool outputs' tokens, in order
    text: str  # the completion as the model saw it, tool outputs included (end-of-text dropped)
    logprobs: list[float]  # the sampling log-prob of each model token; 0.0 on tool-output tokens (never used)
    finish_reason: str  # "stop", "length" (max_new_tokens reached, tool outputs included) or "tool_limit"
    drafted: int = 0  # Sample's, for readers of either (no speculative decoding with tools)
    accepted: int = 0
    model_mask: list[bool] = field(default_factory=list)  # True on the model's tokens, False on tool output
    calls: int = 0  # tool blocks the model closed
    failures: int = 0  # calls that raised, timed out, exceeded a limit or had no opening tag
    timeouts: int = 0  # environment replies past their time (tools count theirs in failures)
    messages: list[dict] = field(default_factory=list)  # with an environment: the turns, policy's and environment's
    prompt_ids: list[int] = field(default_factory=list)  # an agent's (r1lab/engine/agents.py): its first request's
    rewrites: int = 0  # an agent's requests that did not extend the conversation as served (not trained on)


Runner = Callable[[str, ToolSpec], ProgramResult]


def run_in_sandbox(code: str, spec: ToolSpec) -> ProgramResult:
    """One call, through the sandbox's fork servers (a few milliseconds, not a process start-up per call)."""
    return run_program_pooled(code, timeout_s=spec.timeout_s, memory_mb=spec.memory_mb,
                              max_output_bytes=4 * spec.output_chars + 64, sandbox=spec.sandbox)


def closes_block(turn_text: str, token_ids: list[int], spec: ToolSpec, eos_ids: set[int]) -> bool:
    """Whether a turn that stopped did so by closing a tool block (and not by end-of-text after it)."""
    return turn_text.endswith(spec.close) and not (token_ids and token_ids[-1] in eos_ids)


def cut_at_close(turn_text: str, spec: ToolSpec) -> str:
    """A turn's text up to its first close tag (the token that completed the tag may carry more characters)."""
    end = turn_text.find(spec.close)
    return turn_text if end < 0 else turn_text[: end + len(spec.close)]


def call_tool(code: str | None, spec: ToolSpec, runner: Runner) -> ProgramResult | None:
    """Run a block's code (None: no opening tag); a runner that raises is a failed call, not a crashed rollout."""
    if code is None:
        return None
    try:
        return runner(code, spec)
    except Exception as err:  # noqa: BLE001 - anything the runner raises becomes the call's error
        return ProgramResult("", False, error=f"the tool could not run: {type(err).__name__}: {err}")


def output_tokens(result: ProgramResult | None, spec: ToolSpec, tokenizer: Any, room: int) -> tuple[list[int], str]:
    """The output block's tokens and text as the model reads them, cut at `room` tokens."""
    return _fit(output_text(result, spec), tokenizer, room)[:2]


def _fit(text: str, tokenizer: Any, room: int) -> tuple[list[int], str, bool]:
    """text's tokens and text, cut to fewer than room tokens where they fill it; and whether they did."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    if len(ids) < room:
        return ids, text, False
    ids = ids[: max(room, 0)]
    return ids, tokenizer.decode(ids), True


def tool_summary(spec: ToolSpec) -> str:
    """What serve and chat say at start with --tools."""
    return (f"python, {spec.open}...{spec.close} blocks (at most {spec.max_calls} per reply, {spec.timeout_s:g} s "
            f"and {spec.memory_mb} MB each); tool calls run {sandbox_summary(spec.sandbox)}")


def block_code(turn_text: str, spec: ToolSpec) -> str | None:
    """The code of the block a turn ends with (turn_text ends with the close tag), or None without an opening tag."""
    body = turn_text[: len(turn_text) - len(spec.close)]
    start = body.rfind(spec.open)
    return None if start < 0 else body[start + len(spec.open) :]


def output_text(result: ProgramResult | None, spec: ToolSpec) -> str:
    """The output block after a call: what the code printed, cut to output_chars, and why it failed when it did."""
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
    pending: str | None = None  # the text of the turn that just ended for a response (a tool block, an env's turn)


def turn_seed(seed: int | None, sample: int, turn: int) -> int | None:
    """The seed of a rollout's turn >= 1: a pure function of its prompt's seed, its sample index and the turn."""
    return None if seed is None else step_seed(seed, turn, f"tool-turn/{sample}")


class Turns(Protocol):
    """What answers a rollout between its turns: tool calls (ToolTurns) or an environment (EnvTurns)."""

    stops: tuple[str, ...]  # stop strings that end a turn for a response

    def ended(self, r: _Rollout, sample: Any, eos_ids: set[int]) -> bool:
        """Whether the turn just appended to r waits for a response."""

    def respond(self, pending: list[_Rollout], tokenizer: Any, max_new_tokens: int) -> None:
        """Append each pending rollout's response (append_context); clear r.pending where the rollout ends."""


def generate_with_tools(engine: Any, prompt_ids: list[list[int]], spec: ToolSpec | Turns, *, num_samples: int = 1,
                        max_new_tokens: int = 128, seed: int | list[int | None] | None = None,
                        stop_strings: tuple[str, ...] = (), runner: Runner = run_in_sandbox,
                        **sampling: Any) -> list[ToolSample]:
    """num_samples rollouts per prompt (prompt-major, like Engine.generate) with tool calls (a ToolSpec) or another
    responder's turns. seed: one per prompt, or an int each prompt's is drawn from; sampling: Engine.generate's."""
    if hasattr(spec, "rollouts"):  # an agent drives its own turns (r1lab/engine/agents.py)
        return spec.rollouts(engine, prompt_ids, num_samples=num_samples, max_new_tokens=max_new_tokens, seed=seed,
                             stop_strings=stop_strings, **sampling)
    turns = ToolTurns(spec, runner) if isinstance(spec, ToolSpec) else spec
    seeds = prompt_seeds(seed, len(prompt_ids))
    stops = (*turns.stops, *stop_strings)
    first = engine.generate(prompt_ids, num_samples=num_samples, max_new_tokens=max_new_tokens, seed=seeds,
                            stop_strings=stops, **sampling)
    rollouts = [_Rollout(prompt_ids[s.prompt_index], seeds[s.prompt_index], i % num_samples,
                         ToolSample(s.prompt_index, [], "", [], s.finish_reason)) for i, s in enumerate(first)]
    for r, s in zip(rollouts, first):
        _add_turn(r, s, turns, engine.tokenizer.eos_ids)
    turn = 1
    while pending := [r for r in rollouts if r.pending is not None]:
        turns.respond(pending, engine.tokenizer, max_new_tokens)
        going = [r for r in pending if r.pending is not None]
        if going:
            samples = engine.generate([r.prompt + r.out.token_ids for r in going], num_samples=1,
                                      max_new_tokens=[max_new_tokens - len(r.out.token_ids) for r in going],
                                      seed=[turn_seed(r.seed, r.sample, turn) for r in going], stop_strings=stops,
                                      **sampling)
            for r, s in zip(going, samples):
                r.pending = None
                _add_turn(r, s, turns, engine.tokenizer.eos_ids)
        turn += 1
    return [r.out for r in rollouts]


def prompt_seeds(seed: int | list[int | None] | None, n: int) -> list[int | None]:
    """Each prompt's seed: as given (one per prompt), or drawn from an int (None: unseeded)."""
    return list(seed) if isinstance(seed, (list, tuple)) else \
        [None if seed is None else step_seed(seed, i, "tool-prompt") for i in range(n)]


def append_turn(out: ToolSample, sample: Any) -> None:
    """Append a turn the model sampled (its tokens trained on)."""
    out.token_ids += sample.token_ids
    out.logprobs += sample.logprobs
    out.model_mask += [True] * len(sample.token_ids)
    out.text += sample.text
    out.finish_reason = sample.finish_reason


def _add_turn(r: _Rollout, sample: Any, turns: Turns, eos_ids: set[int]) -> None:
    """Append a turn's model tokens; mark the rollout pending when the turn waits for a response."""
    append_turn(r.out, sample)
    if turns.ended(r, sample, eos_ids):
        r.pending = sample.text


def append_context(r: _Rollout, text: str, max_new_tokens: int, tokenizer: Any) -> None:
    """Append text the model reads but did not sample, cut at the token budget (the rollout then ends by length)."""
    ids, text, cut = _fit(text, tokenizer, max_new_tokens - len(r.out.token_ids))
    if cut:
        r.out.finish_reason, r.pending = "length", None
    r.out.token_ids += ids
    r.out.logprobs += [0.0] * len(ids)
    r.out.model_mask += [False] * len(ids)
    r.out.text += text


@dataclass
class ToolTurns:
    """Tool calls: a turn that closes a tool block waits for the block's output."""

    spec: ToolSpec
    runner: Runner = run_in_sandbox

    @property
    def stops(self) -> tuple[str, ...]:
        return (self.spec.close,)

    def ended(self, r: _Rollout, sample: Any, eos_ids: set[int]) -> bool:
        return sample.finish_reason == "stop" and closes_block(sample.text, sample.token_ids, self.spec, eos_ids)

    def respond(self, pending: list[_Rollout], tokenizer: Any, max_new_tokens: int) -> None:
        """Run the pending rollouts' blocks in parallel and append their outputs; past the call limit, end."""
        spec = self.spec
        for r in pending:
            r.out.calls += 1
        allowed = [r for r in pending if r.out.calls <= spec.max_calls]
        codes = [block_code(r.pending, spec) for r in allowed]
        with ThreadPoolExecutor(max_workers=max(1, min(len(allowed), os.cpu_count() or 1))) as pool:
            results = list(pool.map(lambda code: call_tool(code, spec, self.runner), codes))
        for r in pending:
            if r.out.calls > spec.max_calls:
                r.out.failures += 1
                r.out.finish_reason, r.pending = "tool_limit", None
        for r, result in zip(allowed, results):
            r.out.failures += result is None or not result.ok
            append_context(r, output_text(result, spec), max_new_tokens, tokenizer)


@dataclass
class EnvTurns:
    """An environment's turns (r1lab/rewards/environments): a policy turn that ends with end-of-text, short of
    max_turns, waits for its reply, whose messages are appended as the template renders them after an assistant turn
    (context_delta): the policy's sampled tokens are never decoded and re-encoded."""

    env: Any  # an Environment
    problems: list  # the problem of each prompt, in the prompts' order
    tokenizer: Any
    template: str
    prefill: str = ""
    timeout_s: float = 5.0  # of one reply; past it the episode ends, counted in timeouts
    stops: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.env.max_turns > 1:  # a template that cannot render a conversation fails here, at start
            context_delta(self.tokenizer, [{"role": "user", "content": "?"}], self.template)

    def ended(self, r: _Rollout, sample: Any, eos_ids: set[int]) -> bool:
        r.out.messages.append({"role": "assistant", "content": sample.text})
        turns = sum(m["role"] == "assistant" for m in r.out.messages)
        return (turns < self.env.max_turns and sample.finish_reason == "stop" and bool(sample.token_ids)
                and sample.token_ids[-1] in eos_ids)

    def respond(self, pending: list[_Rollout], tokenizer: Any, max_new_tokens: int) -> None:
        problems = [self.problems[r.out.prompt_index] for r in pending]
        outcomes = call_all(self.env.reply, [(p, conversation(p, r.out.messages)) for p, r in zip(problems, pending)],
                            self.timeout_s, getattr(self.env, "sessions", 16))
        for r, (kind, reply) in zip(pending, outcomes):
            r.out.calls += 1
            r.out.failures += kind == "error"
            r.out.timeouts += kind == "timeout"
            if kind != "ok" or reply.done or not reply.messages:
                r.pending = None
                continue
            r.out.messages += reply.messages
            text = context_delta(tokenizer, reply.messages, self.template) + self.prefill
            append_context(r, text, max_new_tokens, tokenizer)


def conversation(problem: Any, messages: list[dict]) -> list[dict]:
    """A rollout's whole conversation: its problem's prompt messages, then the turns."""
    return [*(problem.messages or [{"role": "user", "content": problem.prompt}]), *messages]


_MARK = "\x00assistant-turn\x00"


def context_delta(tokenizer: Any, messages: list[dict], template: str) -> str:
    """The text the template puts after an assistant turn's end-of-text for messages that follow it, through the next
    assistant turn's opening: the difference between a stand-in conversation rendered with and without them."""
    base = [{"role": "user", "content": "?"}, {"role": "assistant", "content": _MARK}]
    before = render_conversation(tokenizer, base, template, add_generation_prompt=False)
    after = render_conversation(tokenizer, base + messages, template, add_generation_prompt=True)
    end = before.index(_MARK) + len(_MARK)
    if tokenizer.eos_token and before.startswith(tokenizer.eos_token, end):  # the policy sampled it already
        end += len(tokenizer.eos_token)
    if not after.startswith(before[:end]):
        raise ValueError(f"template {template!r} renders an assistant turn differently once messages follow it: the "
                         "environment's messages cannot be appended after the policy's tokens")
    return after[end:]
