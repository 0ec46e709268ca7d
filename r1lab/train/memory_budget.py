"""Refuse at start settings whose largest step cannot fit in memory (counting only the big, countable parts)."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import torch

from r1lab.model.architecture import ModelConfig
from r1lab.model.facts import kv_cache_bytes_per_token
from r1lab.model.loading import DTYPES
from r1lab.model.transformer import CausalLM
from r1lab.train.logprobs import LOGITS_CHUNK_BYTES

ADAMW_BYTES = 16  # float32 weight, gradient and two moments, per trained parameter
SAMPLED_TOKEN_BYTES = 12  # the engine's output per token: an int64 id and a float32 log-prob
_CGROUP_LIMITS = ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes")


class MemoryBudgetError(ValueError):
    """Settings whose estimate exceeds the device's memory (a ValueError: the CLI prints it)."""


def check_grpo_memory(cfg, device: torch.device, ranks: int = 1) -> None:
    """Refuse a GRPOConfig whose largest step cannot fit on device, from the model's config.json alone."""
    config_file = Path(cfg.model) / "config.json"
    if not config_file.is_file():
        return
    model_cfg = ModelConfig.from_file(config_file)
    check_fits(grpo_parts(cfg, model_cfg, ranks), device,
               "lower samples_per_prompt or prompts_per_step, set rollout_slots, lower micro_batch_size or "
               "max_new_tokens, or set recompute_logits")


def grpo_parts(cfg, model_cfg: ModelConfig, ranks: int = 1) -> dict[str, int]:
    """Bytes of one rank's largest GRPO step, by part."""
    params, width = parameter_count(model_cfg), DTYPES[cfg.dtype].itemsize
    parts = weight_parts(params, cfg.lora_rank, width, ranks if cfg.shard else 1)
    if (cfg.dtype != "float32" and not cfg.lora_rank) or cfg.shard:  # grpo.rollout_policy
        parts["rollout copy of the weights"] = params * width
    if cfg.kl_coef and not cfg.lora_rank:  # grpo.reference_policy
        parts["KL reference model"] = params * width
    sequences = max(1, cfg.prompts_per_step // ranks) * cfg.samples_per_prompt
    rows = min(cfg.rollout_slots or sequences, sequences)
    # the engine samples in the training dtype (float32, a bf16 copy, or LoRA's base), its cache alike
    parts[f"KV cache of {rows:,} rollouts x {cfg.max_new_tokens} tokens"] = (
        rows * cfg.max_new_tokens * kv_cache_bytes_per_token(model_cfg, DTYPES[cfg.dtype]))
    parts[f"sampled tokens of {sequences:,} rollouts"] = sequences * cfg.max_new_tokens * SAMPLED_TOKEN_BYTES
    micro = min(cfg.micro_batch_size, sequences)
    parts.update(logits_part(micro * cfg.max_new_tokens, model_cfg.vocab_size, cfg.recompute_logits,
                             f"{micro} sequences x {cfg.max_new_tokens} tokens"))
    return parts


def check_supervised_memory(cfg, model: torch.nn.Module, docs: list[list[int]], device: torch.device,
                            ranks: int = 1) -> None:
    """Refuse a pretraining or SFT run whose largest step (the longest documents' micro-batch) cannot fit."""
    params = sum(p.numel() for p in model.parameters())
    lora_rank, shards = getattr(cfg, "lora_rank", 0), ranks if getattr(cfg, "shard", False) else 1
    per_pass = cfg.micro_batch_size or -(-cfg.batch_size // ranks)  # lm_step: the micro-batch, or the rank's share
    tokens = sum(max(len(d) - 1, 0) for d in sorted(docs, key=len)[-per_pass:])  # upper bound on targets
    parts = weight_parts(params, lora_rank, DTYPES[cfg.dtype].itemsize, shards)
    parts.update(logits_part(tokens, model.config.vocab_size, cfg.recompute_logits,
                             f"{min(per_pass, len(docs))} longest documents, {tokens:,} tokens"))
    check_fits(parts, device, "lower micro_batch_size or batch_size" + (", max_len" if hasattr(cfg, "max_len") else "")
               + ", or set recompute_logits")


def weight_parts(params: int, lora_rank: int, width: int, shards: int = 1) -> dict[str, int]:
    if lora_rank:  # the frozen base in the training dtype; the adapters' state is small beside it
        return {"frozen weights": params * width}
    return {"weights, gradients and AdamW state": params * ADAMW_BYTES // shards}


def logits_part(tokens: int, vocab_size: int, recompute: bool, what: str) -> dict[str, int]:
    """The log-softmax the backward pass keeps (one chunk with recompute)."""
    kept = tokens * vocab_size * 4
    if recompute:
        return {"logits (one chunk, recomputed)": min(kept, LOGITS_CHUNK_BYTES)}
    return {f"logits kept for the backward pass ({what} x {vocab_size:,} vocabulary)": kept}


def parameter_count(model_cfg: ModelConfig) -> int:
    with torch.device("meta"):  # shapes only: no memory
        return sum(p.numel() for p in CausalLM(model_cfg).parameters())


def check_fits(parts: dict[str, int], device: torch.device, advice: str) -> None:
    """MemoryBudgetError when parts exceed the device's memory (a GPU's total, or RAM; MPS's is not known)."""
    if device.type == "cuda":
        available, where = torch.cuda.mem_get_info(device)[1], str(device)
    else:
        available, where = (ram_bytes() if device.type == "cpu" else None), "this machine's RAM"
    total = sum(parts.values())
    if available is None or total <= available:
        return
    largest = sorted(parts.items(), key=lambda item: -item[1])[:3]
    shown = "; ".join(f"{name} {gigabytes(size)}" for name, size in largest)
    raise MemoryBudgetError(f"these settings need an estimated {gigabytes(total)} of memory ({shown}) and "
                            f"{where} has {gigabytes(available)}: {advice}")


def ram_bytes() -> int | None:
    """The machine's RAM, or the container's lower memory limit (None where neither is known)."""
    limits = []
    with contextlib.suppress(AttributeError, ValueError, OSError):
        limits.append(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    for path in _CGROUP_LIMITS:
        with contextlib.suppress(OSError):
            text = Path(path).read_text().strip()
            if text.isdigit():  # "max": no limit
                limits.append(int(text))
    return min(limits, default=None)


def gigabytes(n: int) -> str:
    return f"{n / 1e9:,.1f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"
