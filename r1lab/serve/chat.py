"""`r1lab chat --model DIR`: a terminal chat, one message per line from stdin, each reply streamed and split into
reasoning and answer as `r1lab serve` does (tool calls included). `/reset` starts over, `/quit` leaves.
"""

from __future__ import annotations

import itertools
import re
import sys
from typing import Callable, Iterator, TextIO

from rich.console import Console

from r1lab.config import ChatConfig, ServeConfig
from r1lab.cpu.process import setup_training_process
from r1lab.engine.engine import Engine
from r1lab.engine.tools import (ToolSpec, block_code, call_tool, closes_block, output_tokens, run_in_sandbox,
                                tool_summary, turn_seed)
from r1lab.model.loading import load_policy, pick_device
from r1lab.model.templates import render_conversation, starts_in_think
from r1lab.serve.reasoning import ReasoningSplitter
from r1lab.serve.textstream import TextStream


def load_engine(cfg: ChatConfig | ServeConfig) -> Engine:
    setup_training_process(cfg.threads, cfg.model, cfg.device)
    model, tokenizer = load_policy(cfg.model, pick_device(cfg.device), cfg.dtype, cfg.adapter)
    return Engine(model.eval(), tokenizer, speculative=getattr(cfg, "speculative", "none"))  # serve's


# C0 controls but newline and tab, DEL and C1: escape sequences could clear the screen or write the clipboard
CONTROLS = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def printable(text: str) -> str:
    """The model's (or its tool's) text for the terminal: every control character shown as its \\xNN escape."""
    return CONTROLS.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


class ReplyView:
    """Prints a reply's reasoning and answer deltas as they come, each part under its own label."""

    def __init__(self, console: Console):
        self.console = console
        self.part = None  # "reasoning" or "answer": the part being printed

    def show(self, reasoning: str, content: str) -> None:
        if reasoning:
            self._write("reasoning", "thinking: ", reasoning, "dim italic")
        if content:
            self._write("answer", "answer: ", content, "")

    def _write(self, part: str, label: str, text: str, style: str) -> None:
        if self.part != part:
            if self.part is not None:
                self.console.print()
            self.console.print(label, style="bold cyan" if part == "answer" else "bold dim", end="")
            self.part = part
        self.console.print(printable(text), style=style, end="", markup=False, highlight=False, soft_wrap=True)

    def close(self, note: str = "") -> None:
        if self.part is not None:
            self.console.print()
        else:  # the model ended its reply at once (or with white space only): say so rather than print nothing
            self.console.print("(empty reply)", style="dim")
        if note:
            self.console.print(printable(note), style="dim", markup=False, highlight=False)


def reply(engine: Engine, messages: list[dict], cfg: ChatConfig, seed: int, view: ReplyView) -> tuple[str, str]:
    """Sample one reply to the conversation, printing it as it streams: (answer text, finish reason)."""
    tok = engine.tokenizer
    prompt_text = render_conversation(tok, messages, cfg.template) + cfg.prefill
    ids = tok.encode(prompt_text)
    room = engine.model.config.max_position_embeddings - len(ids)
    if room < 1:
        raise ValueError(f"the conversation ({len(ids)} tokens) fills the model's context; /reset to start over")
    text, splitter = TextStream(tok), ReasoningSplitter(starts_in_think(prompt_text))
    answer: list[str] = []

    def show(reasoning: str, content: str) -> None:
        answer.append(content)
        view.show(reasoning, content)

    def feed(tokens: list[int]) -> None:
        for t in tokens:
            show(*splitter.feed(text.push(t)))

    tokens, reason, note = _turns(engine, ids, cfg, seed, min(cfg.max_tokens, room), feed)
    show(*splitter.feed(text.flush()))
    show(*splitter.finish())
    view.close(note or (f"[{tokens} tokens, cut at max_tokens]" if reason == "length" else ""))
    return "".join(answer), reason


def _turns(engine: Engine, ids: list[int], cfg: ChatConfig, seed: int, budget: int,
           feed: Callable[[list[int]], None]) -> tuple[int, str, str]:
    """Generate a reply turn by turn, feeding every token (sampled or a tool output's) to feed: (tokens, finish
    reason, a note on why it ended or "")."""
    spec = ToolSpec.of(cfg)
    completion: list[int] = []
    for turn in itertools.count():
        sample = engine.generate([ids + completion], max_new_tokens=budget - len(completion),
                                 temperature=cfg.temperature, top_p=cfg.top_p,
                                 seed=[seed if turn == 0 else turn_seed(seed, 0, turn)],
                                 stop_strings=(spec.close,) if spec else (), on_step=lambda _rows, t: feed(t))[0]
        completion += sample.token_ids
        if spec is None or sample.finish_reason != "stop" or \
                not closes_block(sample.text, sample.token_ids, spec, engine.tokenizer.eos_ids):
            return len(completion), sample.finish_reason, ""
        if turn >= spec.max_calls:  # this block is call max_calls + 1
            return len(completion), "stop", f"[a tool call past max_tool_calls ({spec.max_calls}) ends the reply]"
        result = call_tool(block_code(sample.text, spec), spec, run_in_sandbox)
        out, _ = output_tokens(result, spec, engine.tokenizer, budget - len(completion))
        feed(out)
        completion += out
        if len(completion) >= budget:
            return len(completion), "length", ""


def user_lines(source: TextIO, console: Console) -> Iterator[str]:
    """Lines typed at a prompt, or read from a pipe (echoed, so a transcript reads as a conversation)."""
    while True:
        if source.isatty():
            try:
                line = console.input("[bold green]you>[/] ")
            except EOFError:
                return
        else:
            line = source.readline()
            if not line:
                return
            console.print(f"you> {line.rstrip()}", style="bold green", markup=False, highlight=False)
        yield line.strip()


def run_chat(cfg: ChatConfig, source: TextIO | None = None, console: Console | None = None,
             engine: Engine | None = None) -> None:
    console = console or Console(highlight=False)
    engine = engine or load_engine(cfg)
    opening = [{"role": "system", "content": cfg.system}] if cfg.system else []
    messages = list(opening)
    console.print(f"r1lab chat with {cfg.model}: one message per line, /reset to start over, /quit to leave",
                  style="dim", markup=False, highlight=False)
    if cfg.tools:
        console.print(f"tools: {tool_summary(ToolSpec.of(cfg))}", style="dim", markup=False, highlight=False)
    for turn, line in enumerate(user_lines(source or sys.stdin, console)):
        if line in ("/quit", "/exit"):
            break
        if line == "/reset":
            messages = list(opening)
            console.print("(conversation cleared)", style="dim")
            continue
        if not line:
            continue
        messages.append({"role": "user", "content": line})
        try:
            answer, _ = reply(engine, messages, cfg, cfg.seed + turn, ReplyView(console))
        except ValueError as err:
            messages.pop()
            console.print(f"error: {err}", style="red", markup=False, highlight=False)
            continue
        messages.append({"role": "assistant", "content": answer})
