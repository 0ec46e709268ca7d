"""Loading what a command runs (device, dtype, model, tokenizer, adapter), and prompts that fit the model's context."""

from __future__ import annotations

import re

import torch

from r1lab.model.hf_format import load_model
from r1lab.model.lora import load_adapter, merge_lora
from r1lab.model.templates import render_conversation
from r1lab.model.tokenizer import Tokenizer, load_tokenizer
from r1lab.model.transformer import CausalLM
from r1lab.suggest import did_you_mean

# `Problem` in annotations is a task's (rewards/tasks/base.py), read for its prompt only: model/ imports no task


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


DEVICES = "auto, cpu, cuda, cuda:N, mps"


def device_problem(value: str) -> str | None:
    """The device must exist on this machine: found when the settings are read, before any weights load."""
    if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", value):
        return f"{value!r} is not one of {DEVICES}{did_you_mean(value, ('auto', 'cpu', 'cuda', 'mps'))}"
    if value == "mps" and not torch.backends.mps.is_available():
        return "'mps' is not available on this machine; use auto or cpu"
    if not value.startswith("cuda"):
        return None
    if not torch.cuda.is_available():
        return f"{value!r} but CUDA is not available on this machine (torch {torch.__version__}); use auto or cpu"
    count = torch.cuda.device_count()
    if int(value.partition(":")[2] or 0) >= count:
        return f"{value!r} but this machine has {count} CUDA device(s): cuda:0 to cuda:{count - 1}"
    return None


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def load_policy(path: str, device: torch.device, dtype: str = "float32",
                adapter: str = "") -> tuple[CausalLM, Tokenizer]:
    """A model directory's model (in dtype) and tokenizer, with its stop ids; an adapter directory merged in."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    model = load_model(path, device=device, dtype=DTYPES[dtype])
    if adapter:
        load_adapter(model, adapter)
        merge_lora(model)
    tokenizer = load_tokenizer(path)
    tokenizer.add_eos_ids(model.config.eos_token_id)
    if not tokenizer.eos_ids:
        raise ValueError(f"{path}: no end-of-text token in tokenizer_config.json or config.json")
    return model, tokenizer


def encode_prompt(tokenizer: Tokenizer, problem: Problem, template: str, prefill: str = "", system: str = "") -> list[int]:
    return tokenizer.encode(prompt_text(tokenizer, problem, template, prefill, system))


def prompt_text(tokenizer: Tokenizer, problem: Problem, template: str, prefill: str = "", system: str = "") -> str:
    """The text the model continues for a problem: its conversation after the system message, rendered, then prefill."""
    if template == "none":
        if problem.messages is not None or system:
            raise ValueError("template 'none' sends a question as it is: a conversational prompt or a system message "
                             "needs a template (auto, chat or r1zero)")
        return problem.prompt + prefill
    messages = problem.messages or [{"role": "user", "content": problem.prompt}]
    if system and not any(m["role"] == "system" for m in messages):
        messages = [{"role": "system", "content": system}, *messages]
    return render_conversation(tokenizer, messages, template, add_generation_prompt=True) + prefill


def describe_prompts(tokenizer: Tokenizer, problem: Problem, template: str, prefill: str = "",
                     system: str = "") -> str:
    """One line for the log at start: which template renders the prompts, and the first prompt as the model sees it."""
    chosen = template
    if template == "auto":
        chosen = "chat (the model's chat template)" if tokenizer.chat_template else "r1zero (the tokenizer has no chat template)"
    text = prompt_text(tokenizer, problem, template, prefill, system)
    shown = text if len(text) <= 400 else text[:200] + " ... " + text[-150:]
    return f"template {chosen}; the first prompt as the model sees it: {shown!r}"


def check_context(model: CausalLM, tokenizer: Tokenizer, problems: list[Problem], template: str, prefill: str,
                  max_new_tokens: int, source: str, system: str = "") -> None:
    """Refuse, before any step, prompts that with max_new_tokens would not fit the model's context."""
    context = model.config.max_position_embeddings
    if max_new_tokens >= context:
        raise ValueError(f"max_new_tokens {max_new_tokens} leaves no room for a prompt in the model's context of "
                         f"{context} tokens (max_position_embeddings)")
    too_long = []
    for problem in problems:
        n = len(encode_prompt(tokenizer, problem, template, prefill, system))
        if n + max_new_tokens > context:
            where = f"{source}:{problem.meta['row']}" if "row" in problem.meta else f"{source}: {problem.prompt[:40]!r}"
            too_long.append(f"{where}: prompt of {n} tokens + max_new_tokens {max_new_tokens} > context {context}")
    if too_long:
        more = f"\n... and {len(too_long) - 10} more" if len(too_long) > 10 else ""
        raise ValueError(f"{len(too_long)} prompt(s) do not fit the model's context with max_new_tokens "
                         f"(shorten them, lower --max-new-tokens, or drop those rows):\n" + "\n".join(too_long[:10]) + more)
