"""The transformer's layers: RMSNorm, rotary rotation, grouped-query attention, the gated MLP and their Linear."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from r1lab.model.architecture import ModelConfig


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32 as transformers does, so bf16 runs match it.
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


@dataclass
class FastPaths:
    """Faster products installed by r1lab/cpu at process set-up (model/ never imports cpu/); None: torch's own.
    few_rows_linear(x, weight, bias): x @ W.T + b over the few rows of a CPU decode step."""

    few_rows_linear: Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor] | None = None


FAST_PATHS = FastPaths()
FEW_ROWS = 32  # rows of x up to which a float32 CPU product takes FAST_PATHS.few_rows_linear (a decode step's batch)
IN_PLACE_GRAD_MIN = 1 << 20  # weights whose gradient _InPlaceGradLinear writes (smaller ones cost no page faults)


def is_dtensor(t: torch.Tensor) -> bool:
    """Whether t is an FSDP DTensor; looked up, not imported (the import costs ~0.7 s of every command's start)."""
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(t, module.DTensor)


def few_rows_product(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor | None:
    """x @ W.T + b through the installed few-rows product; None where none is or x is not a few float32 CPU rows."""
    product = FAST_PATHS.few_rows_linear
    if product is None or x.device.type != "cpu" or x.dtype != torch.float32 or x.numel() // x.shape[-1] > FEW_ROWS:
        return None
    return product(x, weight, bias)


class Linear(nn.Linear):
    """nn.Linear with the few-rows fast path and gradients written in place (_InPlaceGradLinear)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # not for autocast (it casts inside F.linear) nor DTensors (FSDP reduces their gradients from its hooks)
        w = self.weight
        if (torch.is_grad_enabled() and w.requires_grad and w.numel() >= IN_PLACE_GRAD_MIN
                and not is_dtensor(w) and not torch.is_autocast_enabled(x.device.type)):
            return _InPlaceGradLinear.apply(x, w, self.bias)
        y = few_rows_product(x, self.weight, self.bias)
        return super().forward(x) if y is None else y


class _InPlaceGradLinear(torch.autograd.Function):
    """x @ W.T + b whose backward adds into W.grad and b.grad in place, not a fresh (out, in) gradient a CPU must
    fault in and zero. A hook on the weight does not see these gradients; a post-accumulate-grad hook still fires."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight, bias)
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_y):
        x, weight, bias = ctx.saved_tensors
        dy = grad_y.reshape(-1, grad_y.shape[-1])
        grad_x = (dy @ weight).view(x.shape) if ctx.needs_input_grad[0] else None
        if ctx.needs_input_grad[1]:
            flat_x = x.reshape(-1, x.shape[-1])
            if weight.grad is None:
                weight.grad = torch.mm(dy.t(), flat_x)
            else:
                weight.grad.addmm_(dy.t(), flat_x)
        if bias is not None and ctx.needs_input_grad[2]:
            bias.grad = dy.sum(0) if bias.grad is None else bias.grad.add_(dy.sum(0))
        return grad_x, None, None


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv, self.hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.qkv_proj = Linear(cfg.hidden_size, (self.n_heads + 2 * self.n_kv) * self.hd, bias=cfg.qkv_bias)
        self.o_proj = Linear(self.n_heads * self.hd, cfg.hidden_size, bias=cfg.o_bias)
        if cfg.qk_norm:
            self.q_norm, self.k_norm = RMSNorm(self.hd, cfg.rms_norm_eps), RMSNorm(self.hd, cfg.rms_norm_eps)
        self.qk_norm = cfg.qk_norm

    def forward(self, x, cos, sin, mask, cache=None, start=0):
        B, T, _ = x.shape
        H, KV = self.n_heads, self.n_kv
        qkv = self.qkv_proj(x).view(B, T, H + 2 * KV, self.hd)
        qk = qkv[:, :, : H + KV]  # rotary embedding on query and key heads at once
        if self.qk_norm:
            qk = torch.cat([self.q_norm(qk[:, :, :H]), self.k_norm(qk[:, :, H:])], dim=2)
        qk = (qk * cos + rotate_half(qk) * sin).transpose(1, 2)  # (B, H + KV, T, hd)
        q, k = qk[:, :H], qk[:, H:]
        v = qkv[:, :, H + KV :].transpose(1, 2)  # (B, KV, T, hd)
        if cache is not None:
            k, v = write_cache(cache, start, k, v)
        y = attend(q, k, v, mask, causal=mask is None and T > 1)  # (B, H, T, hd)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, H * self.hd))


def write_cache(cache: tuple, start, *new: torch.Tensor) -> tuple:
    """Store this step's tensors (B, h, T, d) at [start, start + T); return what is attended: all cached so far, or
    the whole buffer when start is a (1,) tensor (a static decode step, under its mask)."""
    if torch.is_tensor(start):
        for buffer, t in zip(cache, new):
            buffer.index_copy_(2, start, t)
        return cache
    end = start + new[0].shape[2]
    for buffer, t in zip(cache, new):
        buffer[:, :, start:end] = t
    return tuple(buffer[:, :, :end] for buffer in cache)


def attend(q, k, v, mask, causal: bool) -> torch.Tensor:
    """Scaled dot-product attention with grouped KV heads, without copying the cache per head where torch allows."""
    groups = q.shape[1] // k.shape[1]
    if q.shape[2] == 1 and q.device.type == "cpu":  # one query per row: two batched matmuls, cheaper than SDPA's setup
        B, H, _, hd = q.shape
        scores = (q.view(B, H // groups, groups, hd) @ k.transpose(-1, -2)) * hd**-0.5  # (B, KV, G, S)
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))  # mask (B, 1, 1, S) broadcasts over heads
        return (scores.softmax(-1) @ v).view(B, H, 1, hd)
    if groups > 1 and not _SDPA_GQA:
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    extra = {"enable_gqa": True} if groups > 1 and _SDPA_GQA else {}
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, **extra)


_SDPA_GQA = "enable_gqa" in (F.scaled_dot_product_attention.__doc__ or "")


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d, f, b = cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias
        self.gate_up_proj, self.down_proj = Linear(d, 2 * f, bias=b), Linear(f, d, bias=b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)
