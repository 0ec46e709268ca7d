"""What every command that runs a model shares: the device, the dtype, loading a model directory with its tokenizer,
turning a problem into prompt tokens, and the per-step seeds that make runs resumable and reproducible."""

from __future__ import annotations

import hashlib

import torch

from r1lab.model import CausalLM, load_model
from r1lab.tasks.base import Problem
from r1lab.templates import render_prompt
from r1lab.tokenizer import Tokenizer, load_tokenizer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


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


def encode_prompt(tokenizer: Tokenizer, problem: Problem, template: str, prefill: str = "") -> list[int]:
    return tokenizer.encode(render_prompt(tokenizer, problem.prompt, template, prefill))


def step_seed(seed: int, step: int, purpose: str) -> int:
    """A seed per (run seed, step, purpose): a resumed run draws exactly what an uninterrupted one would."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{step}/{purpose}".encode()).digest()[:4], "little")
