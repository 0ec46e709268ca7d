"""`r1lab chat --model DIR`: a terminal chat with a model directory, for use without a browser.

Reads one message per line from stdin (typed, or piped: `printf 'What is 2+3?\n' | r1lab chat --model DIR`), and
streams each reply as it is sampled: the reasoning (<think>...</think>) dimmed under "thinking", then the answer,
split exactly as the server's reasoning_content and content. `/reset` starts over, `/quit` (or end of input) leaves.
It runs the engine in-process, with the same prompt rendering and text streaming as `r1lab serve`.
"""

from __future__ import annotations

import sys
from typing import Iterator, TextIO

from rich.console import Console

from r1lab.config import ChatConfig
from r1lab.engine import Engine
from r1lab.policy import load_policy, pick_device
from r1lab.runtime import setup_training_process
from r1lab.serve.reasoning import ReasoningSplitter
from r1lab.serve.textstream import TextStream
from r1lab.templates import render_conversation, starts_in_think


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
        self.console.print(text, style=style, end="", markup=False, highlight=False, soft_wrap=True)

    def close(self, note: str = "") -> None:
        if self.part is not None:
            self.console.print()
        if note:
            self.console.print(note, style="dim", markup=False, highlight=False)


def reply(engine: Engine, messages: list[dict], cfg: ChatConfig, seed: int, view: ReplyView) -> tuple[str, str]:
    """Sample one reply to the conversation, printing it as it streams. Returns (answer text, finish reason)."""
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

    def on_step(_rows: list[int], tokens: list[int]) -> None:
        for t in tokens:
            show(*splitter.feed(text.push(t)))

    sample = engine.generate([ids], max_new_tokens=min(cfg.max_tokens, room), temperature=cfg.temperature,
                             top_p=cfg.top_p, seed=[seed], on_step=on_step)[0]
    show(*splitter.feed(text.flush()))
    show(*splitter.finish())
    view.close(f"[{len(sample.token_ids)} tokens, cut at max_tokens]" if sample.finish_reason == "length" else "")
    return "".join(answer), sample.finish_reason


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
    if engine is None:
        setup_training_process(cfg.threads, cfg.model)
        model, tokenizer = load_policy(cfg.model, pick_device(cfg.device), cfg.dtype, cfg.adapter)
        engine = Engine(model.eval(), tokenizer)
    opening = [{"role": "system", "content": cfg.system}] if cfg.system else []
    messages = list(opening)
    console.print(f"r1lab chat with {cfg.model}: one message per line, /reset to start over, /quit to leave",
                  style="dim", markup=False, highlight=False)
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
