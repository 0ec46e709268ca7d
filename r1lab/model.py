"""Decoder-only transformer for the Qwen2 / Qwen2.5 / Qwen3 / Llama families, with Hugging Face-format load and save.
DeepSeek-V3 and Qwen3-MoE use the same model with their layers from r1lab/mla.py (latent attention) and r1lab/moe.py.

Module names mirror transformers' (model.layers.N.self_attn.o_proj, ...), except that q/k/v and gate/up are each one
fused projection (qkv_proj, gate_up_proj): one larger matrix product instead of three or two, in decode and training.
load_model and save_model split and join them, so checkpoints on disk hold transformers' tensor names exactly.
Two forward paths share every layer: `forward` (training, full sequences) and `forward_cached` (the engine's prefill
and decode, writing into a preallocated KV cache).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor
from torch.utils.checkpoint import checkpoint

from r1lab import decode_matmul
from r1lab.grad_buffers import IN_PLACE_GRAD_MIN, take_spare

SUPPORTED_ARCHITECTURES = {"Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3", "LlamaForCausalLM": "llama",
                           "DeepseekV3ForCausalLM": "deepseek_v3", "Qwen3MoeForCausalLM": "qwen3_moe"}
# Llama and Qwen3 read attention_bias (a bias on q/k/v/o or none); Qwen2 always has a q/k/v bias and none on o_proj.
ATTENTION_BIAS_ARCHITECTURES = ("LlamaForCausalLM", "Qwen3ForCausalLM", "Qwen3MoeForCausalLM")
# Multi-head latent attention (r1lab/mla.py) and mixture-of-experts layers (r1lab/moe.py)
MLA_ARCHITECTURES = ("DeepseekV3ForCausalLM",)
MOE_ARCHITECTURES = ("DeepseekV3ForCausalLM", "Qwen3MoeForCausalLM")


@dataclass
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int | None = None
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = True
    qkv_bias: bool = True  # Qwen2: q/k/v have a bias, o_proj none
    o_bias: bool = False  # Llama's and Qwen3's attention_bias puts a bias on all four
    qk_norm: bool = False  # Qwen3: RMSNorm over each head of q and k, before the rotary embedding
    mlp_bias: bool = False
    architecture: str = "Qwen2ForCausalLM"
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    mla: dict | None = None  # MLA's config.json keys (r1lab/mla.py); None: grouped-query attention
    moe: dict | None = None  # mixture-of-experts config.json keys (r1lab/moe.py); None: dense MLP in every layer
    extra: dict = field(default_factory=dict)  # unknown HF keys, written back unchanged

    def __post_init__(self) -> None:
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.mla:  # the rotary part's width, as transformers sets head_dim for DeepSeek-V3
            self.head_dim = self.mla["qk_rope_head_dim"]
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")

    @classmethod
    def from_hf(cls, hf: dict, source: str = "config.json") -> "ModelConfig":
        arch = (hf.get("architectures") or [None])[0]
        if arch is None:  # configs built in code lack "architectures"; the model_type says the same
            arch = {v: k for k, v in SUPPORTED_ARCHITECTURES.items()}.get(hf.get("model_type"))
        if arch not in SUPPORTED_ARCHITECTURES:
            raise ValueError(
                f"{source}: architecture {arch!r} (model_type {hf.get('model_type')!r}) is not supported; "
                f"r1lab supports {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        if hf.get("use_sliding_window") or "sliding_attention" in (hf.get("layer_types") or []):
            raise ValueError(f"{source}: sliding-window attention is not supported")
        if hf.get("hidden_act", "silu") != "silu":
            raise ValueError(f"{source}: hidden_act {hf['hidden_act']!r} is not supported (only silu)")
        rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
        theta = rope.pop("rope_theta", None) or hf.get("rope_theta", 10000.0)
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", "llama3") and not (rope_type == "yarn" and arch in MLA_ARCHITECTURES):
            raise ValueError(f"{source}: rope type {rope_type!r} is not supported (default, llama3)")
        own_bias = arch in ATTENTION_BIAS_ARCHITECTURES
        known = set(cls.__dataclass_fields__) | {
            "architectures", "model_type", "rope_parameters", "attention_bias", "hidden_act", "use_sliding_window",
            "torch_dtype", "dtype", "transformers_version", "num_key_value_heads",
        } | _arch_keys(arch)
        return cls(
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_hidden_layers=hf["num_hidden_layers"],
            num_attention_heads=hf["num_attention_heads"],
            num_key_value_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
            head_dim=hf.get("head_dim"),
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            rope_theta=float(theta),
            rope_scaling=rope if rope_type in ("llama3", "yarn") else None,
            max_position_embeddings=hf.get("max_position_embeddings", 2048),
            tie_word_embeddings=hf.get("tie_word_embeddings", arch == "Qwen2ForCausalLM"),  # transformers' defaults
            qkv_bias=hf.get("attention_bias", False) if own_bias else True,
            o_bias=hf.get("attention_bias", False) if own_bias else False,
            qk_norm=arch in ("Qwen3ForCausalLM", "Qwen3MoeForCausalLM"),
            mlp_bias=hf.get("mlp_bias", False),
            architecture=arch,
            bos_token_id=hf.get("bos_token_id"),
            eos_token_id=hf.get("eos_token_id"),
            extra={k: v for k, v in hf.items() if k not in known},
            **_arch_fields(hf, arch, source),
        )

    def to_hf(self, dtype: torch.dtype = torch.float32) -> dict:
        hf = dict(self.extra)
        hf.update(
            architectures=[self.architecture],
            model_type=SUPPORTED_ARCHITECTURES[self.architecture],
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads,
            head_dim=self.head_dim,
            hidden_act="silu",
            rms_norm_eps=self.rms_norm_eps,
            rope_theta=self.rope_theta,
            max_position_embeddings=self.max_position_embeddings,
            tie_word_embeddings=self.tie_word_embeddings,
            bos_token_id=self.bos_token_id,
            eos_token_id=self.eos_token_id,
            torch_dtype=str(dtype).removeprefix("torch."),
        )
        if self.rope_scaling:
            hf["rope_scaling"] = dict(self.rope_scaling)
        if self.architecture in ATTENTION_BIAS_ARCHITECTURES:
            hf.update(attention_bias=self.qkv_bias)
        if self.architecture == "LlamaForCausalLM":
            hf.update(mlp_bias=self.mlp_bias)
        else:
            hf.update(use_sliding_window=False)
        hf.update(self.mla or {}, **(self.moe or {}))
        return hf


def _arch_keys(arch: str) -> set[str]:
    """config.json keys that the mla and moe fields hold (kept out of `extra`)."""
    keys = set(mla.MLA_KEYS) if arch in MLA_ARCHITECTURES else set()
    if arch in MOE_ARCHITECTURES:
        keys |= set(moe.DEEPSEEK_KEYS if arch == "DeepseekV3ForCausalLM" else moe.QWEN_KEYS) | {"num_local_experts"}
    return keys


def _arch_fields(hf: dict, arch: str, source: str) -> dict:
    return {"mla": mla.mla_from_hf(hf, source) if arch in MLA_ARCHITECTURES else None,
            "moe": moe.moe_from_hf(hf, arch) if arch in MOE_ARCHITECTURES else None}


def rope_inverse_frequencies(cfg: ModelConfig) -> torch.Tensor:
    """Inverse frequencies of the rotary embedding, with Llama 3's long-context rescaling when configured."""
    dim = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    s = cfg.rope_scaling
    if not s:
        return inv.float()
    if s.get("rope_type", s.get("type")) == "yarn":
        return mla.yarn_inverse_frequencies(cfg)
    # Llama 3: long wavelengths are slowed by `factor`, short ones kept, the band between interpolated.
    factor, low, high = s["factor"], s.get("low_freq_factor", 1.0), s.get("high_freq_factor", 4.0)
    old_ctx = s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv
    smooth = (old_ctx / wavelen - low) / (high - low)
    scaled = torch.where(wavelen > old_ctx / low, inv / factor, inv)
    mid = (wavelen <= old_ctx / low) & (wavelen >= old_ctx / high)
    return torch.where(mid, (1 - smooth) * inv / factor + smooth * inv, scaled).float()


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


class Linear(nn.Linear):
    """nn.Linear whose products over a few rows (a decode step's batch) take _few_rows_linear on a CPU, and whose
    backward writes its gradients in place (_InPlaceGradLinear)."""

    FEW_ROWS = 32

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _accumulates_in_place(x, self.weight):
            return _InPlaceGradLinear.apply(x, self.weight, self.bias)
        if _few_rows(x, self.FEW_ROWS):
            return _few_rows_linear(x, self.weight, self.bias)
        return super().forward(x)


def _few_rows(x: torch.Tensor, limit: int) -> bool:
    return x.device.type == "cpu" and x.dtype == torch.float32 and x.numel() // x.shape[-1] <= limit


SLICE_ROWS = 512  # see _few_rows_linear: 256-768 measured alike, 15% off a rollout; whole products 11-13 GB/s
SLICED_MIN = 4 << 20  # parameters from which slices pay: below, a decode step is bound by per-call overheads


def _few_rows_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x @ W.T + b for a few rows of x (a decode step's batch) on a CPU, in float32: r1lab/decode_matmul.py's kernel
    where the machine has a C compiler, else MKL's sgemm as below.

    A decode step is bound by reading the weights, and MKL streams them at different rates by orientation and
    size (measured on 2 AVX-512 cores at the Qwen2.5-0.5B shape, 8 rows; 25 GB/s is the read rate of a plain sum):
    a weight of up to a few thousand rows goes fastest as W @ x.T (13-20 GB/s); a taller and large one (SLICED_MIN
    parameters), as gate_up_proj (9,728 rows) or the LM head (151,936), as x @ W.T over slices of SLICE_ROWS rows (15-17 GB/s, where the whole
    product in either orientation ran at 11-13). bf16 goes through other kernels: there the plain product."""
    rows, out = x.numel() // x.shape[-1], weight.shape[0]
    flat = x.reshape(rows, x.shape[-1])
    y = decode_matmul.linear(flat, weight, bias)  # the C kernel, where this machine has it: 1.6x faster
    if y is not None:
        return y.reshape(*x.shape[:-1], out)
    if out <= 4 * SLICE_ROWS or weight.numel() < SLICED_MIN:
        y = (weight @ flat.t()).t() if bias is None else torch.addmm(bias[:, None], weight, flat.t()).t()
    else:
        y = torch.cat([F.linear(flat, weight[i : i + SLICE_ROWS], None if bias is None else bias[i : i + SLICE_ROWS])
                       for i in range(0, out, SLICE_ROWS)], dim=1)
    return y.reshape(*x.shape[:-1], out)


# IN_PLACE_GRAD_MIN (r1lab/grad_buffers.py): weights from which the gradient is written in place; smaller ones come
# from the allocator's free lists (nothing to fault in), where the Python-level autograd function would only add its
# overhead (a 4M-parameter model's step)


def _accumulates_in_place(x: torch.Tensor, weight: nn.Parameter) -> bool:
    """Training one process's own weights, outside autocast (which casts inside F.linear): see _InPlaceGradLinear.
    FSDP's sharded weights (DTensors) keep autograd's path: FSDP reduces their gradients from its hooks."""
    return (torch.is_grad_enabled() and weight.requires_grad and weight.numel() >= IN_PLACE_GRAD_MIN
            and not isinstance(weight, DTensor) and not torch.is_autocast_enabled(x.device.type))


class _InPlaceGradLinear(torch.autograd.Function):
    """x @ W.T + b whose backward adds dY.T @ x into W.grad in place (and dY summed into b.grad).

    Through autograd, every backward of a projection returns a fresh (out, in) gradient that is then added into
    .grad: GRPO's two passes per micro-batch (the shared prompt, then the completions) give two per weight. On a CPU
    each fresh block is new memory the kernel must fault in and zero: at the Qwen2.5-0.5B shape about 3 GB per
    step, a third of the layers' backward time. Writing into .grad removes them. The gradients are the same sums;
    a hook on the weight tensor does not see them (r1lab sums gradients over ranks after backward, not from hooks),
    while a post-accumulate-grad hook still fires once, after every pass's part is in (r1lab/backward_step.py)."""

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
            if weight.grad is None:  # the first pass writes into the last step's gradient memory, if kept
                weight.grad = torch.mm(dy.t(), flat_x, out=take_spare(weight))
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
        if cache is not None and torch.is_tensor(start):  # a static decode step: see CausalLM.decode_step
            k_cache, v_cache = cache
            k_cache.index_copy_(2, start, k)
            v_cache.index_copy_(2, start, v)
            k, v = k_cache, v_cache
        elif cache is not None:
            k_cache, v_cache = cache
            k_cache[:, :, start : start + T] = k
            v_cache[:, :, start : start + T] = v
            k, v = k_cache[:, :, : start + T], v_cache[:, :, : start + T]
        y = attend(q, k, v, mask, causal=mask is None and T > 1)  # (B, H, T, hd)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, H * self.hd))


def attend(q, k, v, mask, causal: bool) -> torch.Tensor:
    """Scaled dot-product attention with grouped KV heads, without copying the cache per head where torch allows."""
    groups = q.shape[1] // k.shape[1]
    if q.shape[2] == 1 and q.device.type == "cpu":
        return _decode_attention(q, k, v, mask, groups)
    if groups > 1 and not _SDPA_GQA:
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    extra = {"enable_gqa": True} if groups > 1 and _SDPA_GQA else {}
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, **extra)


def _decode_attention(q, k, v, mask, groups: int) -> torch.Tensor:
    """One query per row: two batched matmuls over the KV heads, cheaper on a CPU than the fused kernel's setup."""
    B, H, _, hd = q.shape
    qg = q.view(B, H // groups, groups, hd)  # (B, KV, G, hd): the G query heads sharing each KV head
    scores = (qg @ k.transpose(-1, -2)) * hd**-0.5  # (B, KV, G, S)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))  # mask (B, 1, 1, S) broadcasts over heads
    return (scores.softmax(-1) @ v).view(B, H, 1, hd)


_SDPA_GQA = "enable_gqa" in (F.scaled_dot_product_attention.__doc__ or "")


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d, f, b = cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias
        self.gate_up_proj, self.down_proj = Linear(d, 2 * f, bias=b), Linear(f, d, bias=b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, index: int = 0):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg) if cfg.mla is None else mla.MLAttention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = moe.MoE(cfg) if cfg.moe is not None and moe.is_moe_layer(cfg, index) else MLP(cfg)

    def forward(self, x, cos, sin, mask, cache=None, start=0):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, start)
        return x + self.mlp(self.post_attention_layernorm(x))


class Backbone(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        # A tied embedding's gradient is the LM head's (V, D) one plus the lookup's few rows: a sparse lookup gradient
        # is added into it in place, where a dense one would be another (V, D) tensor at the end of every backward.
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size, sparse=cfg.tie_word_embeddings)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class KVCache:
    """Preallocated keys and values for every layer: (B, KV, max_len, hd) each; with MLA, the latent and the rotary
    key instead (r1lab/mla.py)."""

    def __init__(self, cfg: ModelConfig, batch: int, max_len: int, dtype: torch.dtype, device: torch.device):
        shape = (batch, cfg.num_key_value_heads, max_len, cfg.head_dim)
        shapes = (shape, shape) if cfg.mla is None else _mla_cache_shapes(cfg, batch, max_len)
        self.layers = [tuple(torch.zeros(s, dtype=dtype, device=device) for s in shapes)
                       for _ in range(cfg.num_hidden_layers)]

    def select(self, rows: torch.Tensor) -> None:
        """Keep only these batch rows (expanding a shared prompt to G samples, or dropping finished ones)."""
        self.layers = [(k.index_select(0, rows), v.index_select(0, rows)) for k, v in self.layers]

    def copy_row(self, row: int, start: int, source: KVCache, source_row: int, source_start: int, n: int) -> None:
        """Write n positions of source's row (from source_start) into this cache's row at [start, start + n): a
        prefilled prompt moving into a slot of the engine's continuous batch. Dimension 2 is the position in both
        layouts (grouped keys and values, MLA's latents)."""
        for layer, source_layer in zip(self.layers, source.layers):
            for t, s in zip(layer, source_layer):
                t[row, :, start : start + n] = s[source_row, :, source_start : source_start + n]

    def first_rows(self, n: int) -> KVCache:
        """A cache over this one's first n rows, sharing its memory: a forward over a batch smaller than the buffer
        (r1lab/live_batch.py) writes its keys straight into this cache."""
        view = KVCache.__new__(KVCache)
        view.layers = [tuple(t[:n] for t in layer) for layer in self.layers]
        return view

    def slide(self, shift: int, used: int) -> None:
        """Move positions [shift, used) to [0, used - shift) in every row: the columns before shift are no longer
        attended by any row, and sliding them out keeps the attended width, and the cache, bounded."""
        for layer in self.layers:
            for t in layer:
                t[:, :, : used - shift] = t[:, :, shift:used].clone()  # overlapping ranges: copy first


class CausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = Backbone(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.register_buffer("inv_freq", rope_inverse_frequencies(cfg), persistent=False)
        self.apply(self._init_weights)
        self.checkpoint_layers = False  # set_activation_checkpointing

    def set_activation_checkpointing(self, on: bool) -> None:
        """Full-sequence training passes (SFT, pretraining) keep each layer's input only and recompute the rest in
        backward. Not for MoE models, whose forward counts expert loads (a recomputation would count them twice)."""
        if on and self.config.moe is not None:
            raise ValueError("activation_checkpointing is for dense models: an MoE layer's forward counts its expert "
                             "loads, which recomputing it would count twice")
        self.checkpoint_layers = on

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        # transformers' initializer_range (0.02); torch's default N(0, 1) embedding gives logits in the hundreds
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def _rope(self, positions: torch.Tensor, dtype: torch.dtype):
        freqs = positions[..., None].float() * self.inv_freq  # (B, T, hd/2)
        emb = torch.cat((freqs, freqs), dim=-1)[:, :, None]  # (B, T, 1, hd): broadcast over heads
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def hidden_states(self, input_ids, attention_mask=None, position_ids=None, cache=None, start=0, key_mask=None):
        """Final normalised hidden states (B, T, D).

        attention_mask (B, T): 1 for real tokens (padding on either side) when no cache is used.
        With a cache, tokens are written at positions [start, start+T) and key_mask (B, start+T) marks real keys.
        """
        B, T = input_ids.shape
        if key_mask is None:
            key_mask = attention_mask.bool() if attention_mask is not None else torch.ones(B, T, dtype=torch.bool, device=input_ids.device)
        if position_ids is None:
            position_ids = (key_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -T:]
        x = self.model.embed_tokens(input_ids)
        cos, sin = self._rope(position_ids, x.dtype)
        # Without padding on the left, plain causal attention is exact (right padding is never attended to by a
        # real token) and takes the fused kernel; mask=None selects it.
        mask = None if cache is None and attention_mask is None else attention_mask_4d(key_mask, T, start)
        layers = cache.layers if cache is not None else [None] * len(self.model.layers)
        if self.config.moe is not None and mask is not None:  # expert load counts (moe.count_loads) skip padding
            moe.mark_real_tokens(self, key_mask[:, -T:])
        recompute = self.checkpoint_layers and cache is None and torch.is_grad_enabled()
        for layer, kv in zip(self.model.layers, layers):
            # Activation checkpointing: only the layer's input is kept; backward runs its forward again.
            x = checkpoint(layer, x, cos, sin, mask, use_reentrant=False) if recompute else \
                layer(x, cos, sin, mask, kv, start)
        return self.model.norm(x)

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """Logits of the engine's last positions h (B, D): a decode step's few rows take _few_rows_linear."""
        if not torch.is_grad_enabled() and _few_rows(h, Linear.FEW_ROWS):
            return _few_rows_linear(h, self.lm_head.weight, self.lm_head.bias)
        return self.lm_head(h)

    def forward(self, input_ids, attention_mask=None, position_ids=None):
        """Logits (B, T, V) for full sequences (training and parity checks)."""
        return self.lm_head(self.hidden_states(input_ids, attention_mask, position_ids))

    def completion_hidden_states(self, prompts, prompt_mask, rows, completions, completion_mask) -> torch.Tensor:
        """Hidden states (B, C, D) that predict each completion token, each distinct prompt run only once.

        prompts (U, P) left-padded with prompt_mask (U, P); completion b continues prompt rows[b]; completions (B, C)
        right-padded with completion_mask (B, C). A GRPO group's G samples share one prompt: its keys and values are
        computed once and expanded to the G rows (autograd sums their gradients back), instead of running the prompt
        G times. Exact: every completion token attends to the same keys as in a full-sequence forward.
        """
        U, P = prompts.shape
        C = completions.shape[1]
        cache = KVCache(self.config, U, P + C, self.lm_head.weight.dtype, prompts.device)
        prompt_pos = (prompt_mask.long().cumsum(-1) - 1).clamp(min=0)
        key_mask = torch.cat([prompt_mask[rows], completion_mask], dim=1)  # (B, P + C)
        positions = prompt_pos[rows, -1:] + 1 + torch.arange(C, device=prompts.device)  # (B, C)
        prompt_in = self._layer_inputs(prompts, prompt_pos, prompt_mask, 0)
        completion_in = self._layer_inputs(completions, positions, key_mask, P)
        x_prompt, x_completion = prompt_in[0], completion_in[0]
        # Layer by layer, the prompt and then its completions: backward then finishes each layer's gradient (both
        # passes' parts) before it starts on the layer below, so that an optimizer step in the backward pass
        # (r1lab/backward_step.py) can free it. (Autograd runs the later-created of two ready nodes first.)
        for layer, (k, v) in zip(self.model.layers, cache.layers):
            x_prompt = self._run_layer(layer, x_prompt, prompt_in, (k, v), 0, prompt_mask)
            # a view of the group's prompt keys per sample: autograd sums the G samples' gradients back
            expanded = (k.index_select(0, rows), v.index_select(0, rows))
            x_completion = self._run_layer(layer, x_completion, completion_in, expanded, P, completion_mask)
        h_prompt, h_completion = self.model.norm(x_prompt), self.model.norm(x_completion)
        # token 0 is predicted by the prompt's last position (left padding puts it at P - 1), token j by token j - 1
        return torch.cat([h_prompt[rows, -1:], h_completion[:, :-1]], dim=1)

    def _layer_inputs(self, input_ids, position_ids, key_mask, start: int):
        """(embeddings, cos, sin, attention mask) of tokens written into a cache at [start, start + T)."""
        x = self.model.embed_tokens(input_ids)
        cos, sin = self._rope(position_ids, x.dtype)
        return x, cos, sin, attention_mask_4d(key_mask, input_ids.shape[1], start)

    def _run_layer(self, layer, x, inputs, kv, start: int, real):
        """One layer over one pass of completion_hidden_states; an MoE layer counts the pass's real tokens."""
        if self.config.moe is not None:
            moe.mark_real_tokens(self, real)
        return layer(x, inputs[1], inputs[2], inputs[3], kv, start)

    def decode_step(self, input_ids, position_ids, cache: KVCache, write_pos: torch.Tensor, mask) -> torch.Tensor:
        """One decode step with every shape fixed: logits (B, V) of input_ids (B, 1).

        The new keys and values are written at write_pos (a (1,) tensor, not a Python int) and the whole cache is
        attended under mask (B, 1, 1, max_len), so successive steps run the very same kernels on the same buffers:
        what a CUDA graph captures once and replays (r1lab/static_decode.py).
        """
        x = self.model.embed_tokens(input_ids)
        cos, sin = self._rope(position_ids, x.dtype)
        for layer, kv in zip(self.model.layers, cache.layers):
            x = layer(x, cos, sin, mask, kv, write_pos)
        return self.head(self.model.norm(x)[:, -1])

    def forward_cached(self, input_ids, position_ids, cache: KVCache, start: int, key_mask) -> torch.Tensor:
        """Logits of the last position only (B, V): prefill when T > 1, one decode step when T == 1."""
        h = self.hidden_states(input_ids, None, position_ids, cache, start, key_mask)
        return self.head(h[:, -1])


def _mla_cache_shapes(cfg: ModelConfig, batch: int, max_len: int) -> list:
    return mla.cache_shapes(cfg, batch, max_len)


def attention_mask_4d(key_mask: torch.Tensor, T: int, start: int) -> torch.Tensor:
    """Boolean (B, 1, T, S) mask: causal, real keys only, and always the token itself.

    Allowing the diagonal keeps padding rows finite (a row with no allowed key would give NaN, and NaN keys poison
    every later query through 0 * NaN in the attention product).
    """
    S = key_mask.shape[1]
    q_pos = torch.arange(start, start + T, device=key_mask.device)[:, None]  # (T, 1)
    k_pos = torch.arange(S, device=key_mask.device)[None, :]  # (1, S)
    causal = k_pos <= q_pos  # (T, S)
    return ((causal[None] & key_mask[:, None, :]) | (k_pos == q_pos)[None])[:, None]


# ----------------------------------------------------------------------------------------------------------------
# Hugging Face format: config.json + model.safetensors (or sharded with model.safetensors.index.json)


_FUSED = {"self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
          "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj")}


def _fused_sizes(fused: str, cfg: ModelConfig) -> list[int]:
    if fused == "self_attn.qkv_proj":
        return [cfg.num_attention_heads * cfg.head_dim] + [cfg.num_key_value_heads * cfg.head_dim] * 2
    return [cfg.intermediate_size] * 2


def split_fused(state: dict, cfg: ModelConfig) -> dict:
    """r1lab's state dict with transformers' names: qkv_proj -> q/k/v_proj, gate_up_proj -> gate/up_proj."""
    out = {}
    for name, tensor in state.items():
        fused = next((f for f in _FUSED if f".{f}." in name), None)
        if fused is None:
            out[name] = tensor
            continue
        parts = tensor.split(_fused_sizes(fused, cfg), dim=0)
        for part_name, part in zip(_FUSED[fused], parts):
            out[name.replace(fused, part_name)] = part
    if cfg.moe is not None:  # expert banks -> one tensor per expert
        out = moe.split_experts(out, cfg)
    return out


def join_fused(state: dict, cfg: ModelConfig) -> dict:
    """transformers' state dict with r1lab's fused projections (the inverse of split_fused)."""
    out = dict(state)
    for i in range(cfg.num_hidden_layers):
        for fused, parts in _FUSED.items():
            for kind in ("weight", "bias"):
                names = [f"model.layers.{i}.{p}.{kind}" for p in parts]
                if all(n in out for n in names):
                    out[f"model.layers.{i}.{fused}.{kind}"] = torch.cat([out.pop(n) for n in names], dim=0)
    if cfg.moe is not None:
        out = moe.join_experts(out, cfg)
    return out


def load_model(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> CausalLM:
    from safetensors.torch import load_file

    path = Path(path)
    config_file = path / "config.json"
    if not config_file.exists():
        raise FileNotFoundError(f"{path}: no config.json (expected a Hugging Face model directory)")
    cfg = ModelConfig.from_hf(json.loads(config_file.read_text()), str(config_file))
    index = path / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (path / "model.safetensors").exists():
        files = ["model.safetensors"]
    else:
        raise FileNotFoundError(f"{path}: no model.safetensors or model.safetensors.index.json")
    state = {}
    for f in files:
        state.update(load_file(str(path / f)))
    with torch.device("meta"):
        model = CausalLM(cfg)
    if cfg.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    expected = set(split_fused(model.state_dict(), cfg))
    missing = expected - set(state) - ({"lm_head.weight"} if cfg.tie_word_embeddings else set())
    unexpected = set(state) - expected
    if missing or unexpected:
        raise ValueError(f"{path}: weights do not match the config: missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}")
    model.load_state_dict(_owned(join_fused(state, cfg), state, device), strict=False, assign=True)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.inv_freq = rope_inverse_frequencies(cfg)
    return model.to(device=device, dtype=dtype)


def _owned(joined: dict, mapped: dict, device) -> dict:
    """joined's tensors on device, none of them a view of the file.

    safetensors maps the file into memory: every page a tensor reads stays counted in the process's memory as long as
    any tensor of the file is alive. The fused projections are already new tensors (torch.cat), but the rest, kept as
    views, would hold the whole mapping, so that the q/k/v and gate/up pages read to build the fused ones stayed
    resident beside them: about half the weights again. Copying the rest lets the mapping go when loading ends."""
    return {name: t.to(device=device, copy=name in mapped) for name, t in joined.items()}


def save_model(model: CausalLM, path: str | Path, dtype: torch.dtype | None = None, max_shard_bytes: int = 4 << 30,
               state: dict | None = None) -> None:
    """Write config.json, generation_config.json and safetensors weights that transformers and vLLM load; the
    weights are model's own, or state (a full state dict of it, e.g. gathered from the ranks of a sharded model)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to(dtype or v.dtype).contiguous().cpu()
             for k, v in split_fused(model.state_dict() if state is None else state, model.config).items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight")  # shared with embed_tokens; safetensors refuses aliased tensors
    dtype = dtype or next(model.parameters()).dtype
    shards, current, size = [], {}, 0
    for name, t in state.items():
        if current and size + t.numel() * t.element_size() > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = t
        size += t.numel() * t.element_size()
    shards.append(current)
    for old in list(path.glob("model*.safetensors")) + list(path.glob("model.safetensors.index.json")):
        old.unlink()
    if len(shards) == 1:
        save_file(shards[0], str(path / "model.safetensors"), metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, shard in enumerate(shards, 1):
            name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(path / name), metadata={"format": "pt"})
            weight_map.update({k: name for k in shard})
        total = sum(t.numel() * t.element_size() for t in state.values())
        (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    cfg = model.config
    (path / "config.json").write_text(json.dumps(cfg.to_hf(dtype), indent=2))
    gen = {"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id}
    (path / "generation_config.json").write_text(json.dumps({k: v for k, v in gen.items() if v is not None}, indent=2))


# The DeepSeek-V3 and MoE layers build on this module's config and layers, so they are imported after them; every
# use of mla and moe above runs at call time, when both are complete.
from r1lab import mla, moe  # noqa: E402
