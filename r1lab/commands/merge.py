"""`r1lab merge --model BASE --adapter DIR --out DIR`: a LoRA adapter (PEFT's format, as GRPO and SFT write it with
lora_rank > 0) merged into its base model, written as a plain Hugging Face model directory that transformers, vLLM
and every r1lab command load without the adapter."""

from __future__ import annotations

from pathlib import Path

import torch

from r1lab.config import MergeConfig
from r1lab.model.hf_format import save_model
from r1lab.model.loading import DTYPES, load_policy


def merge(cfg: MergeConfig) -> Path:
    cfg.check()
    model, tokenizer = load_policy(cfg.model, torch.device("cpu"), "float32", cfg.adapter)  # merged in float32
    out = Path(cfg.out)
    save_model(model, out, dtype=DTYPES[cfg.dtype])
    tokenizer.save(out)
    return out
