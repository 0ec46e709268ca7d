"""Chat messages -> the prompt text the model continues: the model's own chat template, else the R1-Zero template.

The chat template comes from the model directory's tokenizer_config.json (`chat_template`), as transformers uses
it. A model without one (r1lab's tiny models) gets the R1-Zero template this project trains with, extended to
several turns: earlier answers are replayed as `<answer>...</answer>`, and their reasoning is left out, as
DeepSeek's API asks clients to do.
"""

from __future__ import annotations

from r1lab.serve.reasoning import THINK_OPEN
from r1lab.tokenizer import R1_ZERO_PREAMBLE, R1_ZERO_SUFFIX, Tokenizer, apply_chat_template

PROMPT_TEMPLATES = ("auto", "chat", "r1zero")


def render_messages(tokenizer: Tokenizer, messages: list[dict], template: str = "auto", prefill: str = "") -> str:
    """messages: [{"role": "system"|"user"|"assistant", "content": str}, ...], ending with a user turn."""
    if template not in PROMPT_TEMPLATES:
        raise ValueError(f"template {template!r} is not one of {', '.join(PROMPT_TEMPLATES)}")
    if template == "chat" or (template == "auto" and tokenizer.chat_template):
        text = apply_chat_template(tokenizer, messages)
    else:
        text = r1zero_conversation(messages)
    return text + prefill


def r1zero_conversation(messages: list[dict]) -> str:
    """System text first, then the R1-Zero preamble and the turns: `q1. Assistant: <answer>a1</answer> User: q2...`"""
    system = "\n".join(m["content"] for m in messages if m["role"] in ("system", "developer"))
    parts = [f"{system}\n" if system else "", R1_ZERO_PREAMBLE]
    for m in messages:
        if m["role"] == "user":
            parts.append(f"{m['content']}{R1_ZERO_SUFFIX}")
        elif m["role"] == "assistant":
            parts.append(f" <answer>{m['content']}</answer> User: ")
    return "".join(parts)


def starts_in_think(prompt_text: str) -> bool:
    """Whether the completion begins inside the reasoning: the prompt ends with an open `<think>` (a prefill, or a
    chat template such as DeepSeek-R1's that adds one)."""
    return prompt_text.rstrip().endswith(THINK_OPEN)
