"""Hugging Face format (config.json, safetensors shards) in transformers' names: the fused qkv_proj and gate_up_proj
are split on save and joined on load; MTP modules (mtp.K.*) are stored as V3 ships them, model.layers.{L + K}.*."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import safetensors.torch  # its functions looked up at each call: tests replace save_file
import torch

from r1lab.model import moe
from r1lab.model.architecture import ModelConfig, rope_inverse_frequencies
from r1lab.model.transformer import CausalLM

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
    return _mtp_to_v3_names(out, cfg)


def join_fused(state: dict, cfg: ModelConfig) -> dict:
    """transformers' state dict with r1lab's fused projections (the inverse of split_fused)."""
    out = dict(state)
    for i in range(cfg.num_hidden_layers + cfg.mtp_depth):
        for fused, parts in _FUSED.items():
            for kind in ("weight", "bias"):
                names = [f"model.layers.{i}.{p}.{kind}" for p in parts]
                if all(n in out for n in names):
                    out[f"model.layers.{i}.{fused}.{kind}"] = torch.cat([out.pop(n) for n in names], dim=0)
    if cfg.moe is not None:
        out = moe.join_experts(out, cfg)
    return _mtp_from_v3_names(out, cfg)


def _mtp_layer(cfg: ModelConfig, k: int) -> str:
    return f"model.layers.{cfg.num_hidden_layers + k}."


def _mtp_to_v3_names(state: dict, cfg: ModelConfig) -> dict:
    """mtp.K.* -> model.layers.{L + K}.*, with the copies of the shared embedding and head that V3's layout holds."""
    if not cfg.mtp_depth:
        return state
    out = {}
    for name, t in state.items():
        if name.startswith("mtp."):
            k, rest = name.removeprefix("mtp.").split(".", 1)
            name = _mtp_layer(cfg, int(k)) + rest
        out[name] = t
    head = state.get("lm_head.weight", state["model.embed_tokens.weight"])  # tied: the embedding is the head
    for k in range(cfg.mtp_depth):  # copies: safetensors refuses tensors that share memory
        out[_mtp_layer(cfg, k) + "embed_tokens.weight"] = state["model.embed_tokens.weight"].clone()
        out[_mtp_layer(cfg, k) + "shared_head.head.weight"] = head.clone()
    return out


def _mtp_from_v3_names(state: dict, cfg: ModelConfig) -> dict:
    """model.layers.{L + K}.* -> mtp.K.*; the copies of the embedding and head must equal the main model's."""
    out = {}
    shared = {"embed_tokens.weight": "model.embed_tokens.weight",
              "shared_head.head.weight": "model.embed_tokens.weight" if cfg.tie_word_embeddings else "lm_head.weight"}
    for name, t in state.items():
        k = next((k for k in range(cfg.mtp_depth) if name.startswith(_mtp_layer(cfg, k))), None)
        if k is None:
            out[name] = t
            continue
        rest = name.removeprefix(_mtp_layer(cfg, k))
        if rest in shared:
            main = state.get(shared[rest])
            if main is not None and not torch.equal(t, main):
                raise ValueError(f"{name} differs from {shared[rest]}: r1lab's multi-token prediction module shares "
                                 f"the main model's embedding and output head, as DeepSeek-V3's does")
            continue
        out[f"mtp.{k}.{rest}"] = t
    return out


def load_model(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> CausalLM:
    path = Path(path)
    config_file = path / "config.json"
    if not config_file.exists():
        raise FileNotFoundError(f"{path}: no config.json (expected a Hugging Face model directory)")
    cfg = ModelConfig.from_file(config_file)
    cfg.generation = read_generation_config(path)
    index = path / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (path / "model.safetensors").exists():
        files = ["model.safetensors"]
    else:
        raise FileNotFoundError(f"{path}: no model.safetensors or model.safetensors.index.json")
    state = {}
    for f in files:
        state.update(safetensors.torch.load_file(str(path / f)))
    _drop_absent_mtp(cfg, state, path)
    with torch.device("meta"):
        model = CausalLM(cfg)
    if cfg.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    expected = set(split_fused(model.state_dict(), cfg))
    missing = expected - set(state) - ({"lm_head.weight"} if cfg.tie_word_embeddings else set())
    unexpected = set(state) - expected
    if missing or unexpected:
        raise ValueError(f"{path}: weights do not match the config: missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}")
    # No tensor may stay a view of the file's memory mapping: that would keep the whole mapping resident
    owned = {name: t.to(device=device, copy=name in state or name.startswith("mtp."))
             for name, t in join_fused(state, cfg).items()}
    model.load_state_dict(owned, strict=False, assign=True)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.inv_freq = rope_inverse_frequencies(cfg)
    return model.to(device=device, dtype=dtype)


def _drop_absent_mtp(cfg: ModelConfig, state: dict, path: Path) -> None:
    """A V3 checkpoint written by transformers has num_nextn_predict_layers but no MTP layers: load without them."""
    if cfg.mtp_depth and not any(name.startswith(_mtp_layer(cfg, 0)) for name in state):
        warnings.warn(f"{path}: config.json has num_nextn_predict_layers {cfg.mtp_depth} but the weights hold no "
                      f"{_mtp_layer(cfg, 0)}*: loading without the multi-token prediction module", stacklevel=3)
        cfg.mtp_depth = 0


def save_model(model: CausalLM, path: str | Path, dtype: torch.dtype | None = None, max_shard_bytes: int = 4 << 30,
               state: dict | None = None) -> None:
    """Write config.json, generation_config.json and safetensors weights (model's own, or the full state dict state)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to(dtype or v.dtype).contiguous().cpu()
             for k, v in split_fused(model.state_dict() if state is None else state, model.config).items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight")  # shared with embed_tokens; safetensors refuses aliased tensors
    dtype = dtype or next(model.parameters()).dtype
    shards, current, size = [], {}, 0
    for name, t in state.items():
        if current and size + t.nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = t
        size += t.nbytes
    shards.append(current)
    for old in list(path.glob("model*.safetensors")) + list(path.glob("model.safetensors.index.json")):
        old.unlink()
    n = len(shards)
    names = ["model.safetensors"] if n == 1 else [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    for name, shard in zip(names, shards):
        safetensors.torch.save_file(shard, str(path / name), metadata={"format": "pt"})
    if n > 1:
        index = {"metadata": {"total_size": sum(t.nbytes for t in state.values())},
                 "weight_map": {k: name for name, shard in zip(names, shards) for k in shard}}
        (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    cfg = model.config
    (path / "config.json").write_text(json.dumps(cfg.to_hf(dtype), indent=2))
    (path / "generation_config.json").write_text(json.dumps(generation_config(cfg), indent=2))


def read_generation_config(path: Path) -> dict:
    """A model directory's generation_config.json ({} where there is none)."""
    file = path / "generation_config.json"
    if not file.exists():
        return {}
    try:
        config = json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{file}: not valid JSON ({err})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{file}: expected a JSON object, got {type(config).__name__}")
    return config


def generation_config(cfg) -> dict:
    """The generation_config.json it was loaded with, unchanged; else its token ids."""
    if cfg.generation:
        return dict(cfg.generation)
    return {k: v for k, v in {"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id}.items()
            if v is not None}
