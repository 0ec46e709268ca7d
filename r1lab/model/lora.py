"""LoRA adapters in PEFT's format. Adapters are per Hugging Face module (q_proj, ...) while r1lab fuses q/k/v and
gate/up: a forward hook on the fused Linear adds each part's low-rank term, so every forward path sees them. The base
stays the initial policy: GRPO's KL reference is the model with adapters_disabled."""

from __future__ import annotations

import contextlib
import itertools
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from r1lab.model.architecture import ModelConfig
from r1lab.model.hf_format import _fused_sizes
from r1lab.model.layers import MLP, Attention
from r1lab.model.transformer import CausalLM
from r1lab.suggest import did_you_mean

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")  # Hugging Face names
ALL_LINEAR = LORA_TARGETS  # PEFT's "all-linear": every linear layer but the LM head
# Per module of a decoder layer: the HF modules of each of its Linears, in the order of its output rows
_PARTS = {"self_attn": {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "o_proj": ("o_proj",)},
          "mlp": {"gate_up_proj": ("gate_proj", "up_proj"), "down_proj": ("down_proj",)}}
_PARENT_TYPES = {"self_attn": Attention, "mlp": MLP}
_PARENT = {part: parent for parent, linears in _PARTS.items() for parts in linears.values() for part in parts}
CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."  # PeftModel wraps the model as base_model (a LoraModel), which holds it as .model
# adapter_config.json fields r1lab does not implement: another value is refused rather than computing another model
_UNSUPPORTED_DEFAULTS = {"bias": "none", "use_rslora": False, "use_dora": False, "modules_to_save": None,
                         "rank_pattern": {}, "alpha_pattern": {}, "layers_to_transform": None, "exclude_modules": None,
                         "fan_in_fan_out": False, "lora_bias": False, "target_parameters": None,
                         "trainable_token_indices": None, "layer_replication": None, "alora_invocation_tokens": None,
                         "use_qalora": False, "use_bdlora": None}


def lora_target_names(value: str) -> tuple[str, ...]:
    """lora_targets as module names: "all-linear", or names separated by commas."""
    if value.strip() == "all-linear":
        return ALL_LINEAR
    return tuple(name.strip() for name in value.split(",") if name.strip())


def lora_targets_problem(value: str) -> str | None:
    """What is wrong with a lora_targets setting, or None."""
    names = lora_target_names(value)
    if not names:
        return "names no module"
    unknown = [n for n in names if n not in LORA_TARGETS]
    return f"{unknown[0]!r} is not a module LoRA can adapt{did_you_mean(unknown[0], LORA_TARGETS)}" if unknown else None


@dataclass(frozen=True)
class LoRASpec:
    rank: int
    alpha: float
    targets: tuple[str, ...]  # Hugging Face module names, from ALL_LINEAR

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


class LoRAAdapter(nn.Module):
    """One module's low-rank update scale * B @ A, in float32 (bf16 would round away updates this small)."""

    def __init__(self, in_features: int, out_features: int, rank: int, scale: float, device: torch.device):
        super().__init__()
        self.lora_A = nn.Parameter(torch.empty(rank, in_features, device=device))
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank, device=device))  # zeros: the model starts unchanged
        self.scale = scale
        self.enabled = True

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        """scale * x @ A.T @ B.T: two thin products, never the (out, in) matrix."""
        return (x @ self.lora_A.t()) @ self.lora_B.t() * self.scale


class _AddLowRank:
    """Forward hook of one Linear: its output plus each part's low-rank term (zeros for a part without one)."""

    def __init__(self, parts: list[tuple[LoRAAdapter | None, int]]):
        self.parts = parts  # (adapter or None, that part's number of output rows)
        self.handle: torch.utils.hooks.RemovableHandle | None = None

    def __call__(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor | None:
        if not any(a is not None and a.enabled for a, _ in self.parts):
            return None  # adapters_disabled: the base's output, untouched
        # float32 even under autocast, which would otherwise run these products in bf16
        with torch.autocast(output.device.type, enabled=False):
            x = inputs[0].float()
            deltas = [a.delta(x) if a is not None and a.enabled else x.new_zeros(*x.shape[:-1], rows)
                      for a, rows in self.parts]
            delta = deltas[0] if len(deltas) == 1 else torch.cat(deltas, dim=-1)
            return (output.float() + delta).to(output.dtype)


def add_lora(model: CausalLM, spec: LoRASpec, seed: int = 0) -> list[nn.Parameter]:
    """Freeze the base and install adapters on the targeted modules of every layer (in a ModuleDict `lora` beside the
    fused Linears); returns their parameters. A is initialised as PEFT does, B with zeros."""
    _check_spec(spec)
    if has_lora(model):
        raise ValueError("the model already has LoRA adapters: merge_lora first to add new ones")
    for (i, layer), target in itertools.product(enumerate(model.model.layers), spec.targets):
        parent = getattr(layer, _PARENT[target])
        if not isinstance(parent, _PARENT_TYPES[_PARENT[target]]):
            raise ValueError(
                f"LoRA target {target}: layer {i}'s {_PARENT[target]} is {type(parent).__name__}; LoRA supports the "
                f"standard attention (q/k/v/o_proj) and the dense MLP (gate/up/down_proj) so far, not latent "
                f"attention (MLA) or mixture-of-experts layers")
    for p in model.parameters():
        p.requires_grad_(False)
    generator = torch.Generator().manual_seed(seed)
    params = []
    for layer in model.model.layers:
        for parent_name in _PARTS:
            params += _install(getattr(layer, parent_name), parent_name, model.config, spec, generator)
    return params


def _check_spec(spec: LoRASpec) -> None:
    if not isinstance(spec.rank, int) or spec.rank < 1:
        raise ValueError(f"LoRA rank must be an integer >= 1, got {spec.rank!r}")
    if not spec.targets:
        raise ValueError(f"LoRA needs at least one target module, from {', '.join(ALL_LINEAR)}")
    unknown = [t for t in spec.targets if t not in ALL_LINEAR]
    if unknown:
        raise ValueError(f"unknown LoRA target module(s) {unknown}; valid ones: {', '.join(ALL_LINEAR)}")


def _install(parent: nn.Module, parent_name: str, cfg: ModelConfig, spec: LoRASpec,
             generator: torch.Generator) -> list[nn.Parameter]:
    """Adapters for the targeted modules under parent (a layer's attention or MLP), and a hook on their Linears."""
    adapters = nn.ModuleDict()
    for linear_name, part_names in _PARTS[parent_name].items():
        if not any(p in spec.targets for p in part_names):
            continue
        linear = getattr(parent, linear_name)
        sizes = _fused_sizes(f"{parent_name}.{linear_name}", cfg) if len(part_names) > 1 else [linear.out_features]
        parts = []
        for part, rows in zip(part_names, sizes):
            adapter = None
            if part in spec.targets:
                adapter = adapters[part] = LoRAAdapter(linear.in_features, rows, spec.rank, spec.scale,
                                                       linear.weight.device)
                a = torch.empty(spec.rank, linear.in_features)  # drawn on the CPU: the same A on every device
                nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)
                with torch.no_grad():
                    adapter.lora_A.copy_(a)
            parts.append((adapter, rows))
        hook = _AddLowRank(parts)
        hook.handle = linear.register_forward_hook(hook)
        linear._lora_hook = hook  # for merge_lora (its parts) and removal (its handle)
    if not adapters:
        return []
    parent.lora = adapters
    return list(adapters.parameters())


def _adapters(model: CausalLM) -> Iterator[tuple[str, LoRAAdapter]]:
    """(PEFT's module path, adapter) for every adapter, e.g. ("model.layers.0.self_attn.q_proj", ...)."""
    for name, module in model.named_modules():
        if isinstance(module, LoRAAdapter):
            yield name.replace(".lora.", "."), module


def has_lora(model: nn.Module) -> bool:
    return any(isinstance(m, LoRAAdapter) for m in model.modules())


def lora_state_dict(model: CausalLM) -> dict[str, torch.Tensor]:
    """The adapters' weights under PEFT's names: base_model.model.<module>.lora_A.weight, .lora_B.weight."""
    return {f"{PEFT_PREFIX}{path}.lora_{ab}.weight": getattr(adapter, f"lora_{ab}").detach()
            for path, adapter in _adapters(model) for ab in "AB"}


def _spec_of(model: CausalLM) -> LoRASpec:
    adapters = list(_adapters(model))
    if not adapters:
        raise ValueError("the model has no LoRA adapters (add_lora or load_adapter first)")
    names = {path.rsplit(".", 1)[1] for path, _ in adapters}
    first = adapters[0][1]
    rank = first.lora_A.shape[0]
    return LoRASpec(rank, first.scale * rank, tuple(t for t in ALL_LINEAR if t in names))


def save_adapter(model: CausalLM, path: str | Path, base_model: str) -> None:
    """Write adapter_config.json and adapter_model.safetensors as PEFT does; base_model: base_model_name_or_path."""
    spec = _spec_of(model)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model, "revision": None,
        "inference_mode": True, "r": spec.rank, "lora_alpha": spec.alpha, "target_modules": sorted(spec.targets),
        "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False, "use_rslora": False, "use_dora": False,
        "modules_to_save": None, "init_lora_weights": True, "layers_to_transform": None, "layers_pattern": None,
        "rank_pattern": {}, "alpha_pattern": {}, "exclude_modules": None, "lora_bias": False,
    }
    (path / CONFIG_FILE).write_text(json.dumps(config, indent=2))
    state = {k: v.contiguous().cpu() for k, v in lora_state_dict(model).items()}
    save_file(state, str(path / WEIGHTS_FILE), metadata={"format": "pt"})


def load_adapter(model: CausalLM, path: str | Path) -> LoRASpec:
    """Install the PEFT adapter at path on model and return its spec; on a ValueError the model is left as it was."""
    path = Path(path)
    spec, state = _read_adapter(path)
    trainable = {name: p.requires_grad for name, p in model.named_parameters()}
    add_lora(model, spec)
    try:
        _copy_weights(model, state, path / WEIGHTS_FILE)
    except ValueError:
        _remove_adapters(model)
        for name, p in model.named_parameters():
            p.requires_grad_(trainable[name])
        raise
    return spec


def load_adapter_weights(model: CausalLM, path: str | Path) -> None:
    """The weights of the adapter at path into model's own adapters (resuming); its settings must match."""
    path = Path(path)
    spec, state = _read_adapter(path)
    own = _spec_of(model)
    if spec != own:
        raise ValueError(f"{path / CONFIG_FILE}: rank {spec.rank}, alpha {spec.alpha:g}, targets {list(spec.targets)}; "
                         f"the model's adapters have rank {own.rank}, alpha {own.alpha:g}, targets {list(own.targets)}")
    _copy_weights(model, state, path / WEIGHTS_FILE)


def _read_adapter(path: Path) -> tuple[LoRASpec, dict[str, torch.Tensor]]:
    spec = read_adapter_config(path / CONFIG_FILE)
    weights_file = path / WEIGHTS_FILE
    if not weights_file.exists():
        raise FileNotFoundError(f"{path}: no {WEIGHTS_FILE}")
    return spec, load_file(str(weights_file))


def read_adapter_config(config_file: Path) -> LoRASpec:
    """The LoRASpec of an adapter_config.json (lora_dropout ignored: it only acts in training)."""
    if not config_file.exists():
        raise FileNotFoundError(f"{config_file}: not found (expected a PEFT adapter directory)")
    config = json.loads(config_file.read_text())
    if config.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{config_file}: peft_type {config['peft_type']!r} is not supported (only LORA)")
    for field_name, default in _UNSUPPORTED_DEFAULTS.items():
        value = config.get(field_name, default)
        if value != default and (value or default):  # None, [] and {} all mean none
            raise ValueError(f"{config_file}: {field_name} = {value!r} is not supported (only {default!r})")
    targets = config.get("target_modules")
    if targets == "all-linear":  # PEFT's shorthand: every linear layer but the output head
        targets = list(ALL_LINEAR)
    if not isinstance(targets, list) or not targets or any(t not in ALL_LINEAR for t in targets):
        raise ValueError(f"{config_file}: target_modules = {targets!r} is not supported: a list of module names "
                         f"from {', '.join(ALL_LINEAR)}")
    rank, alpha = config.get("r"), config.get("lora_alpha")
    if not isinstance(rank, int) or rank < 1:
        raise ValueError(f"{config_file}: r = {rank!r} is not a rank (an integer >= 1)")
    if not isinstance(alpha, (int, float)):
        raise ValueError(f"{config_file}: lora_alpha = {alpha!r} is not a number")
    return LoRASpec(rank, float(alpha), tuple(t for t in ALL_LINEAR if t in targets))


def _copy_weights(model: CausalLM, state: dict[str, torch.Tensor], source: Path) -> None:
    """Copy state (PEFT's names) into the model's adapters once names and shapes match exactly."""
    # PEFT may name the weights with its adapter's name (lora_A.default.weight); saved files normally drop it
    state = {k.replace(".default.weight", ".weight"): v for k, v in state.items()}
    expected = lora_state_dict(model)
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{source}: the adapter does not fit the model: missing {missing[:5]}"
                         f"{' ...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
                         f"{' ...' if len(unexpected) > 5 else ''}")
    for key, target in expected.items():
        if state[key].shape != target.shape:
            raise ValueError(f"{source}: {key} has shape {tuple(state[key].shape)}, the model needs "
                             f"{tuple(target.shape)}")
    with torch.no_grad():
        for key, target in expected.items():
            target.copy_(state[key])  # target is the parameter's data (detached): copy in place, to float32


def merge_lora(model: CausalLM) -> None:
    """Fold every adapter into its base weight (W += scale * B @ A) and remove them; every parameter trainable."""
    if not has_lora(model):
        raise ValueError("the model has no LoRA adapters to merge")
    with torch.no_grad():
        for linear in _hooked_linears(model):
            row = 0
            for adapter, rows in linear._lora_hook.parts:
                if adapter is not None:
                    w = linear.weight[row : row + rows]
                    w.copy_((w.float() + (adapter.lora_B @ adapter.lora_A) * adapter.scale).to(w.dtype))
                row += rows
    _remove_adapters(model)
    for p in model.parameters():
        p.requires_grad_(True)


def _hooked_linears(model: CausalLM) -> list[nn.Module]:
    return [m for m in model.modules() if hasattr(m, "_lora_hook")]


def _remove_adapters(model: CausalLM) -> None:
    for linear in _hooked_linears(model):
        linear._lora_hook.handle.remove()
        del linear._lora_hook
    for module in list(model.modules()):
        if isinstance(getattr(module, "lora", None), nn.ModuleDict):
            del module.lora


@contextlib.contextmanager
def adapters_disabled(model: CausalLM) -> Iterator[None]:
    """Inside, the model computes as its base alone (a LoRA run's KL reference)."""
    adapters = [a for _, a in _adapters(model)]
    was = [a.enabled for a in adapters]
    for a in adapters:
        a.enabled = False
    try:
        yield
    finally:
        for a, enabled in zip(adapters, was):
            a.enabled = enabled
