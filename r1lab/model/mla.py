"""Multi-head latent attention (DeepSeek-V2/V3) as transformers computes it. The cache holds per token only the latent
kv_a_layernorm(x W_kv_a) and the shared rotary key; prefill expands them with kv_b_proj, a decode step folds its key
half into the query and applies its value half after the attention (the weight-absorbed form)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from r1lab.model.architecture import ModelConfig, is_yarn, yarn_mscale, yarn_settings
from r1lab.model.layers import RMSNorm, rotate_half, write_cache

LATENT_NORM_EPS = 1e-6  # transformers builds q_a_layernorm and kv_a_layernorm with the default eps, not rms_norm_eps


def cache_shapes(cfg: ModelConfig, batch: int, max_len: int) -> list[tuple[int, ...]]:
    """Per layer: the latent (B, 1, L, kv_lora_rank) and the rotated shared key (B, 1, L, qk_rope_head_dim)."""
    return [(batch, 1, max_len, cfg.mla["kv_lora_rank"]), (batch, 1, max_len, cfg.mla["qk_rope_head_dim"])]


def rope_attention_factor(cfg: ModelConfig) -> float:
    """YaRN's factor on cos and sin (1 without YaRN)."""
    if not is_yarn(cfg):
        return 1.0
    s, factor, _ = yarn_settings(cfg)
    if s.get("attention_factor") is not None:
        return float(s["attention_factor"])
    mscale, mscale_all_dim = s.get("mscale"), s.get("mscale_all_dim")
    if mscale and mscale_all_dim:
        return float(yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim))
    return yarn_mscale(factor)


def softmax_scale(cfg: ModelConfig) -> float:
    scale = (cfg.mla["qk_nope_head_dim"] + cfg.mla["qk_rope_head_dim"]) ** -0.5
    if is_yarn(cfg) and cfg.rope_scaling.get("mscale_all_dim"):
        scale *= yarn_mscale(yarn_settings(cfg)[1], cfg.rope_scaling["mscale_all_dim"]) ** 2
    return scale


class MLAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        m, D = cfg.mla, cfg.hidden_size
        self.n_heads, self.r = cfg.num_attention_heads, m["kv_lora_rank"]
        self.nope, self.rd, self.vd = m["qk_nope_head_dim"], m["qk_rope_head_dim"], m["v_head_dim"]
        qk, bias, H = self.nope + self.rd, m["attention_bias"], self.n_heads
        if m["q_lora_rank"] is None:
            self.q_proj = nn.Linear(D, H * qk, bias=False)
        else:
            self.q_a_proj = nn.Linear(D, m["q_lora_rank"], bias=bias)
            self.q_a_layernorm = RMSNorm(m["q_lora_rank"], LATENT_NORM_EPS)
            self.q_b_proj = nn.Linear(m["q_lora_rank"], H * qk, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(D, self.r + self.rd, bias=bias)
        self.kv_a_layernorm = RMSNorm(self.r, LATENT_NORM_EPS)
        self.kv_b_proj = nn.Linear(self.r, H * (self.nope + self.vd), bias=False)
        self.o_proj = nn.Linear(H * self.vd, D, bias=bias)
        self.scale, self.rope_factor = softmax_scale(cfg), rope_attention_factor(cfg)
        self.interleave = m["rope_interleave"]

    def _rotate(self, x, cos, sin):
        """Rotary embedding of x (B, T, h, rd); cos/sin (B, T, 1, rd) hold cat(freqs, freqs)."""
        if self.interleave:  # DeepSeek's layout: pairs (x0, x1), (x2, x3), ... each turned by one frequency
            c, s = cos[..., : self.rd // 2], sin[..., : self.rd // 2]
            a, b = x[..., 0::2], x[..., 1::2]
            out = torch.cat([a * c - b * s, b * c + a * s], dim=-1)
        else:
            out = x * cos + rotate_half(x) * sin
        return out * self.rope_factor if self.rope_factor != 1.0 else out

    def forward(self, x, cos, sin, mask, cache=None, start=0):
        B, T, _ = x.shape
        H = self.n_heads
        q = self.q_proj(x) if hasattr(self, "q_proj") else self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q_nope, q_rope = q.view(B, T, H, self.nope + self.rd).split([self.nope, self.rd], dim=-1)
        q_rope = self._rotate(q_rope, cos, sin)  # (B, T, H, rd)
        latent, k_rope = self.kv_a_proj_with_mqa(x).split([self.r, self.rd], dim=-1)
        latent = self.kv_a_layernorm(latent)[:, None]  # (B, 1, T, r)
        k_rope = self._rotate(k_rope[:, :, None], cos, sin).transpose(1, 2)  # (B, 1, T, rd)
        if cache is not None:
            latent, k_rope = write_cache(cache, start, latent, k_rope)  # (B, 1, S, r), (B, 1, S, rd)
            if T == 1 or (torch.is_inference_mode_enabled() and self._absorbing_is_cheaper(T)):
                return self.o_proj(self._absorbed(q_nope, q_rope, latent, k_rope, mask))
        return self.o_proj(self._expanded(q_nope, q_rope, latent, k_rope, mask, causal=mask is None and T > 1))

    def _absorbing_is_cheaper(self, T: int) -> bool:
        """Per cached key, expanding costs r * (nope + vd) multiply-adds, absorbing about 2r + rd per query. Training
        passes always expand, so their log-probs agree to the bit."""
        return T * (2 * self.r + self.rd) < self.r * (self.nope + self.vd)

    def _expanded(self, q_nope, q_rope, latent, k_rope, mask, causal: bool) -> torch.Tensor:
        """Keys and values of every head from the latents (training and prefill): (B, T, H * vd)."""
        B, T, H, _ = q_nope.shape
        S = latent.shape[2]
        kv = self.kv_b_proj(latent[:, 0]).view(B, S, H, self.nope + self.vd).transpose(1, 2)  # (B, H, S, nope + vd)
        k_nope, v = kv.split([self.nope, self.vd], dim=-1)
        k = torch.cat([k_nope, k_rope.expand(B, H, S, self.rd)], dim=-1)  # (B, H, S, qk)
        q = torch.cat([q_nope, q_rope], dim=-1).transpose(1, 2)  # (B, H, T, qk)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=self.scale)
        return y.transpose(1, 2).reshape(B, T, H * self.vd)

    def _absorbed(self, q_nope, q_rope, latent, k_rope, mask) -> torch.Tensor:
        """Attention over the cached latents without expanding them: (B, T, H * vd). q_nope . (W_uk c) =
        (W_uk^T q_nope) . c, and sum_s p_s W_uv c_s = W_uv (sum_s p_s c_s)."""
        B, T, H, _ = q_nope.shape
        w = self.kv_b_proj.weight.view(H, self.nope + self.vd, self.r)
        w_uk, w_uv = w[:, : self.nope], w[:, self.nope :]  # (H, nope, r), (H, vd, r)
        # heads and queries as one axis of rows: the products read the cache in place, not copied H times
        q_latent = torch.einsum("bthn,hnr->bhtr", q_nope, w_uk).reshape(B, H * T, self.r)
        q_rope = q_rope.transpose(1, 2).reshape(B, H * T, self.rd)
        scores = torch.baddbmm(q_rope @ k_rope[:, 0].transpose(-1, -2), q_latent, latent[:, 0].transpose(-1, -2))
        scores = scores.view(B, H, T, -1).float() * self.scale  # (B, H, T, S)
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))  # mask (B, 1, T, S) broadcasts over heads
        o_latent = (scores.softmax(-1).to(latent.dtype).view(B, H * T, -1) @ latent[:, 0]).view(B, H, T, self.r)
        return torch.einsum("bhtr,hvr->bthv", o_latent, w_uv).reshape(B, T, H * self.vd)

