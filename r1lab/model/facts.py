"""What a model costs per token, for reports: parameters (all, active) and KV-cache bytes beside a multi-head twin."""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from r1lab.model import moe
from r1lab.model.architecture import ModelConfig
from r1lab.model.transformer import KVCache


def parameter_counts(model: nn.Module) -> tuple[int, int]:
    """(all parameters, those a token runs through), the multi-token prediction modules left out (as V3's 671B)."""
    total = sum(p.numel() for p in model.parameters()) - mtp_parameters(model)
    idle = 0
    for layer in moe.moe_layers(model).values():
        bank = layer.experts
        per_expert = bank.gate_up_proj[0].numel() + bank.down_proj[0].numel()
        idle += (bank.gate_up_proj.shape[0] - layer.gate.top_k) * per_expert
    return total, total - idle


def mtp_parameters(model: nn.Module) -> int:
    """The multi-token prediction modules' own parameters (the embedding and head they share are the model's)."""
    return sum(p.numel() for p in getattr(model, "mtp", nn.ModuleList()).parameters())


def kv_cache_bytes_per_token(cfg: ModelConfig, dtype: torch.dtype = torch.bfloat16) -> int:
    """Bytes of the engine's cache per token, all layers (the meta device gives the sizes without memory)."""
    cache = KVCache(cfg, 1, 1, dtype, torch.device("meta"))
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in layer)


def multi_head_twin(cfg: ModelConfig) -> ModelConfig:
    """A dense multi-head (not grouped, not latent) model of cfg's width, heads and depth: the cache's yardstick."""
    return dataclasses.replace(cfg, mla=None, moe=None, num_key_value_heads=cfg.num_attention_heads,
                               head_dim=cfg.hidden_size // cfg.num_attention_heads)


def architecture_facts(model: nn.Module) -> dict:
    cfg = model.config
    total, active = parameter_counts(model)
    mtp = {"mtp_parameters": mtp_parameters(model)} if cfg.mtp_depth else {}
    return {"architecture": cfg.architecture, "parameters": total, "active_parameters": active, **mtp,
            "kv_cache_bytes_per_token_bf16": kv_cache_bytes_per_token(cfg),
            "multi_head_kv_cache_bytes_per_token_bf16": kv_cache_bytes_per_token(multi_head_twin(cfg))}
