"""A checkpoint's config.json: the supported architectures, ModelConfig in transformers' keys, rotary frequencies."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

SUPPORTED_ARCHITECTURES = {"Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3", "LlamaForCausalLM": "llama",
                           "DeepseekV3ForCausalLM": "deepseek_v3", "Qwen3MoeForCausalLM": "qwen3_moe"}

REQUIRED_SHAPE = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
OPTIONAL_SHAPE = ("num_key_value_heads", "head_dim", "max_position_embeddings")  # null or absent: a default
POSITIVE_NUMBERS = ("rms_norm_eps", "rope_theta")

# attention_bias: a bias on q/k/v/o or none; Qwen2 always has a q/k/v bias and none on o_proj
ATTENTION_BIAS_ARCHITECTURES = ("LlamaForCausalLM", "Qwen3ForCausalLM", "Qwen3MoeForCausalLM")

MLA_ARCHITECTURES = ("DeepseekV3ForCausalLM",)  # multi-head latent attention (mla.py)
MOE_ARCHITECTURES = ("DeepseekV3ForCausalLM", "Qwen3MoeForCausalLM")  # mixture-of-experts layers (moe.py)
MTP_ARCHITECTURE = "DeepseekV3ForCausalLM"  # multi-token prediction modules (transformer.py MTPModule)


def attention_shape_problems(hidden_size: int, num_heads: int, num_kv_heads: int, prefix: str = "") -> list[str]:
    """Whole, even head sizes (rotary embeddings rotate halves) and whole KV groups; prefix: of the settings' names."""
    problems = []
    if hidden_size % num_heads or (hidden_size // num_heads) % 2:
        problems.append(f"{prefix}hidden_size {hidden_size} is not num_heads {num_heads} times an even head size")
    if num_heads % num_kv_heads:
        problems.append(f"{prefix}num_heads {num_heads} is not a multiple of {prefix}num_kv_heads {num_kv_heads}")
    return problems


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
    mla: dict | None = None  # MLA's config.json keys (r1lab/model/mla.py); None: grouped-query attention
    moe: dict | None = None  # mixture-of-experts config.json keys (r1lab/model/moe.py); None: dense MLP in every layer
    mtp_depth: int = 0  # DeepSeek-V3's num_nextn_predict_layers: multi-token prediction modules after the layers
    extra: dict = field(default_factory=dict)  # unknown HF keys, written back unchanged
    # generation_config.json as the model came (eos lists, sampling defaults): written back unchanged
    generation: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.mla:  # the rotary part's width, as transformers sets head_dim for DeepSeek-V3
            self.head_dim = self.mla["qk_rope_head_dim"]
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")
        if self.mtp_depth and self.architecture != MTP_ARCHITECTURE:
            raise ValueError(f"multi-token prediction (mtp_depth {self.mtp_depth}) is DeepSeek-V3's module; "
                             f"{self.architecture} has none")

    @classmethod
    def from_file(cls, config_file: Path) -> ModelConfig:
        try:
            hf = json.loads(config_file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"{config_file}: not valid JSON ({err})") from None
        if not isinstance(hf, dict):
            raise ValueError(f"{config_file}: must hold a JSON object of settings, not {type(hf).__name__}")
        return cls.from_hf(hf, str(config_file))

    @classmethod
    def from_hf(cls, hf: dict, source: str = "config.json") -> "ModelConfig":
        arch = (hf.get("architectures") or [None])[0]
        if arch is None:  # configs built in code lack "architectures"; the model_type says the same
            arch = {v: k for k, v in SUPPORTED_ARCHITECTURES.items()}.get(hf.get("model_type"))
        if arch not in SUPPORTED_ARCHITECTURES:
            raise ValueError(f"{source}: architecture {arch!r} (model_type {hf.get('model_type')!r}) is not supported; "
                             f"r1lab supports {', '.join(SUPPORTED_ARCHITECTURES)}")
        if hf.get("use_sliding_window") or "sliding_attention" in (hf.get("layer_types") or []):
            raise ValueError(f"{source}: sliding-window attention is not supported")
        if hf.get("hidden_act", "silu") != "silu":
            raise ValueError(f"{source}: hidden_act {hf['hidden_act']!r} is not supported (only silu)")
        check_shape_fields(hf, source)
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
            **{k: hf[k] for k in REQUIRED_SHAPE},
            **{k: hf.get(k) for k in ("head_dim", "bos_token_id", "eos_token_id")},
            num_key_value_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
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
            extra={k: v for k, v in hf.items() if k not in known},
            **_arch_fields(hf, arch, source),
        )

    def to_hf(self, dtype: torch.dtype = torch.float32) -> dict:
        shape = (*REQUIRED_SHAPE, "num_key_value_heads", "head_dim")
        rest = ("rms_norm_eps", "rope_theta", "max_position_embeddings", "tie_word_embeddings", "bos_token_id",
                "eos_token_id")
        hf = dict(self.extra)
        hf.update(architectures=[self.architecture], model_type=SUPPORTED_ARCHITECTURES[self.architecture],
                  **{k: getattr(self, k) for k in shape}, hidden_act="silu", **{k: getattr(self, k) for k in rest},
                  torch_dtype=str(dtype).removeprefix("torch."))
        if self.rope_scaling:
            hf["rope_scaling"] = dict(self.rope_scaling)
        if self.architecture in ATTENTION_BIAS_ARCHITECTURES:
            hf.update(attention_bias=self.qkv_bias)
        if self.architecture == "LlamaForCausalLM":
            hf.update(mlp_bias=self.mlp_bias)
        else:
            hf.update(use_sliding_window=False)
        hf.update(self.mla or {}, **(self.moe or {}))
        if self.architecture == MTP_ARCHITECTURE:
            hf.update(num_nextn_predict_layers=self.mtp_depth)
        return hf


def check_shape_fields(hf: dict, source: str) -> None:
    """A missing or mistyped shape field, named with its value (not a failure deep inside the model's construction)."""
    problems = [f"{k} is missing" for k in REQUIRED_SHAPE if k not in hf]
    problems += [f"{k} {hf[k]!r} is not a whole number >= 1" for k in (*REQUIRED_SHAPE, *OPTIONAL_SHAPE)
                 if hf.get(k) is not None and not (type(hf[k]) is int and hf[k] >= 1)]
    problems += [f"{k} {hf[k]!r} is not a number > 0" for k in POSITIVE_NUMBERS if k in hf
                 and not (type(hf[k]) in (int, float) and math.isfinite(hf[k]) and hf[k] > 0)]
    if problems:
        raise ValueError(f"{source}: " + "; ".join(problems))


def _arch_keys(arch: str) -> set[str]:
    """config.json keys that the mla, moe and mtp_depth fields hold (kept out of `extra`)."""
    keys = set(MLA_KEYS) if arch in MLA_ARCHITECTURES else set()
    if arch == MTP_ARCHITECTURE:
        keys.add("num_nextn_predict_layers")
    if arch in MOE_ARCHITECTURES:
        keys |= set(DEEPSEEK_KEYS if arch == "DeepseekV3ForCausalLM" else QWEN_KEYS) | {"num_local_experts"}
    return keys


def _arch_fields(hf: dict, arch: str, source: str) -> dict:
    fields = {"mla": {k: hf.get(k, default) for k, default in MLA_KEYS.items()} if arch in MLA_ARCHITECTURES else None,
              "moe": moe_from_hf(hf, arch) if arch in MOE_ARCHITECTURES else None}
    if fields["mla"] and hf.get("num_key_value_heads") not in (None, hf["num_attention_heads"]):
        raise ValueError(f"{source}: MLA needs num_key_value_heads equal to num_attention_heads (or unset)")
    if arch == MTP_ARCHITECTURE:
        depth = hf.get("num_nextn_predict_layers") or 0
        if not isinstance(depth, int) or depth < 0:
            raise ValueError(f"{source}: num_nextn_predict_layers {depth!r} is not a whole number >= 0")
        fields["mtp_depth"] = depth
    return fields


def rope_inverse_frequencies(cfg: ModelConfig) -> torch.Tensor:
    """Inverse frequencies of the rotary embedding, with Llama 3's long-context rescaling when configured."""
    dim = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    s = cfg.rope_scaling
    if not s:
        return inv.float()
    if is_yarn(cfg):
        return yarn_inverse_frequencies(cfg)
    # Llama 3: long wavelengths are slowed by `factor`, short ones kept, the band between interpolated.
    factor, low, high = s["factor"], s.get("low_freq_factor", 1.0), s.get("high_freq_factor", 4.0)
    old_ctx = s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv
    smooth = (old_ctx / wavelen - low) / (high - low)
    scaled = torch.where(wavelen > old_ctx / low, inv / factor, inv)
    mid = (wavelen <= old_ctx / low) & (wavelen >= old_ctx / high)
    return torch.where(mid, (1 - smooth) * inv / factor + smooth * inv, scaled).float()


# config.json keys of MLA and of the MoE layers, with transformers' defaults
MLA_KEYS = {"q_lora_rank": 1536, "kv_lora_rank": 512, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64,
            "v_head_dim": 128, "rope_interleave": True, "attention_bias": False}
DEEPSEEK_KEYS = {"n_routed_experts": 256, "num_experts_per_tok": 8, "n_shared_experts": 1,
                 "moe_intermediate_size": 2048, "first_k_dense_replace": 3, "n_group": 8, "topk_group": 4,
                 "norm_topk_prob": True, "routed_scaling_factor": 2.5}
QWEN_KEYS = {"num_experts": 128, "num_experts_per_tok": 8, "moe_intermediate_size": 768, "norm_topk_prob": False,
             "decoder_sparse_step": 1, "mlp_only_layers": []}


def moe_from_hf(hf: dict, arch: str) -> dict:
    if arch == "DeepseekV3ForCausalLM":
        return {k: hf.get(k, default) for k, default in DEEPSEEK_KEYS.items()}
    moe = {k: hf.get(k, default) for k, default in QWEN_KEYS.items()}
    moe["num_experts"] = hf.get("num_experts", hf.get("num_local_experts", QWEN_KEYS["num_experts"]))  # either name
    moe["mlp_only_layers"] = list(moe["mlp_only_layers"] or [])
    return moe


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def yarn_settings(cfg: ModelConfig) -> tuple[dict, float, int]:
    s = cfg.rope_scaling
    original = s.get("original_max_position_embeddings") or cfg.max_position_embeddings
    factor = s.get("factor") or cfg.max_position_embeddings / original  # DeepSeek's convention when factor is null
    return s, factor, original


def yarn_inverse_frequencies(cfg: ModelConfig) -> torch.Tensor:
    """YaRN's blend of interpolated and extrapolated frequencies, in float32 as transformers computes them."""
    s, factor, original = yarn_settings(cfg)
    dim, base = cfg.head_dim, cfg.rope_theta
    beta_fast, beta_slow = s.get("beta_fast") or 32, s.get("beta_slow") or 1

    def correction_dim(rotations):
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if s.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2).float() / dim)
    extrapolate = 1 - ramp  # 1 where the original frequencies are kept (high frequencies)
    return (1.0 / (factor * pos_freqs)) * (1 - extrapolate) + (1.0 / pos_freqs) * extrapolate


def is_yarn(cfg: ModelConfig) -> bool:
    s = cfg.rope_scaling or {}
    return s.get("rope_type", s.get("type")) == "yarn"
