"""Mixture-of-experts layers with transformers' routing: DeepSeekMoE (V3: sigmoid, group-limited top-k, shared
experts) and Qwen3-MoE (softmax top-k); expert load counts, V3's bias balancing and sequence-wise balance loss. An
expert bank is two 3-D tensors in memory, one gate/up/down_proj per expert on disk."""

from __future__ import annotations

import contextlib
import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from r1lab.model.architecture import ModelConfig
from r1lab.model.layers import MLP


def _is_deepseek(moe: dict) -> bool:
    return "n_routed_experts" in moe


def num_experts(cfg: ModelConfig) -> int:
    return cfg.moe["n_routed_experts"] if _is_deepseek(cfg.moe) else cfg.moe["num_experts"]


def is_moe_layer(cfg: ModelConfig, index: int) -> bool:
    m = cfg.moe
    if _is_deepseek(m):
        return index >= m["first_k_dense_replace"]
    return index not in m["mlp_only_layers"] and m["num_experts"] > 0 and (index + 1) % m["decoder_sparse_step"] == 0


class SigmoidGroupRouter(nn.Module):
    """DeepSeek-V3's router: returns (weights (N, k) float32, experts (N, k))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        m = cfg.moe
        self.n_experts, self.top_k = m["n_routed_experts"], m["num_experts_per_tok"]
        self.n_group, self.topk_group = m["n_group"] or 1, m["topk_group"] or 1
        self.norm, self.scaling = m["norm_topk_prob"], m["routed_scaling_factor"]
        self.weight = nn.Parameter(torch.empty(self.n_experts, cfg.hidden_size))
        nn.init.normal_(self.weight, std=0.02)
        # the load-balancing bias: chosen on, never weighted by
        self.register_buffer("e_score_correction_bias", torch.zeros(self.n_experts))

    def _apply(self, fn, recurse=True):
        # float32 whatever the model's dtype, as in transformers (bf16 rounding would change the chosen experts)
        weight, bias = self.weight.data, self.e_score_correction_bias
        super()._apply(fn, recurse)
        self.weight.data = weight.to(device=self.weight.device, dtype=torch.float32)
        self.e_score_correction_bias = bias.to(device=self.e_score_correction_bias.device, dtype=torch.float32)
        return self

    def forward(self, x: torch.Tensor):
        scores = F.linear(x.float(), self.weight.float()).sigmoid()  # (N, E)
        choice = scores + self.e_score_correction_bias.float()
        groups = choice.view(-1, self.n_group, self.n_experts // self.n_group)  # (N, G, E/G)
        group_scores = groups.topk(2, dim=-1).values.sum(-1)  # (N, G)
        best_groups = group_scores.topk(self.topk_group, dim=-1, sorted=False).indices
        group_mask = torch.zeros_like(group_scores).scatter_(1, best_groups, 1.0).bool()  # (N, G)
        allowed = group_mask[:, :, None].expand_as(groups).reshape(-1, self.n_experts)
        experts = choice.masked_fill(~allowed, float("-inf")).topk(self.top_k, dim=-1, sorted=False).indices
        weights = scores.gather(1, experts)  # (N, k)
        if self.norm:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        return weights * self.scaling, experts


class SoftmaxRouter(nn.Module):
    """Qwen3-MoE's router: returns (weights (N, k), experts (N, k))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.top_k, self.norm = cfg.moe["num_experts_per_tok"], cfg.moe["norm_topk_prob"]
        self.weight = nn.Parameter(torch.empty(num_experts(cfg), cfg.hidden_size))
        nn.init.normal_(self.weight, std=0.02)

    def forward(self, x: torch.Tensor):
        logits = F.linear(x, self.weight)  # (N, E)
        weights, experts = logits.softmax(-1, dtype=torch.float32).topk(self.top_k, dim=-1)
        if self.norm:
            weights = weights / weights.sum(-1, keepdim=True)
        return weights.to(logits.dtype), experts


class Experts(nn.Module):
    """A bank of SwiGLU experts: gate_up_proj (E, 2F, D) and down_proj (E, D, F), as in transformers."""

    def __init__(self, n_experts: int, hidden: int, inner: int):
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.empty(n_experts, 2 * inner, hidden))
        self.down_proj = nn.Parameter(torch.empty(n_experts, hidden, inner))
        nn.init.normal_(self.gate_up_proj, std=0.02)
        nn.init.normal_(self.down_proj, std=0.02)

    def forward(self, x: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor):
        """x (N, D); experts, weights (N, k). Returns (output (N, D), tokens per expert (E,))."""
        N, k = experts.shape
        flat = experts.reshape(-1)  # (N * k,) one entry per (token, chosen expert)
        order = flat.argsort(stable=True)  # grouped by expert
        counts = torch.bincount(flat, minlength=self.gate_up_proj.shape[0])  # (E,)
        token = order // k  # the token of each grouped entry
        grouped = x[token]  # (N * k, D)
        outputs = []
        for e, rows in enumerate(grouped.split(counts.tolist())):  # one host sync: the group sizes
            if len(rows):
                gate, up = F.linear(rows, self.gate_up_proj[e]).chunk(2, dim=-1)
                outputs.append(F.linear(F.silu(gate) * up, self.down_proj[e]))
        y = torch.cat(outputs) * weights.reshape(-1)[order, None]  # (N * k, D)
        # back to (token, choice) order and summed: a gather, not index_add_ (a CPU parallel region even for few rows)
        return y[order.argsort()].view(N, k, -1).sum(1).to(x.dtype), counts


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        m = cfg.moe
        self.gate = SigmoidGroupRouter(cfg) if _is_deepseek(m) else SoftmaxRouter(cfg)
        self.experts = Experts(num_experts(cfg), cfg.hidden_size, m["moe_intermediate_size"])
        shared = m.get("n_shared_experts") or 0
        self.shared_experts = MLP(dataclasses.replace(
            cfg, intermediate_size=m["moe_intermediate_size"] * shared, mlp_bias=False)) if shared else None
        self.last_expert_counts: torch.Tensor | None = None  # (E,) tokens routed to each expert, last forward
        self.load: torch.Tensor | None = None  # (E,) summed over forwards inside count_loads, else None
        self.real_tokens: torch.Tensor | None = None  # (B, T) set by the model's forward while counting
        self.balance_weight = 0.0  # > 0 inside balance_loss(): training forwards add V3's sequence-wise balance loss
        self.balance_terms: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        flat = x.reshape(-1, D)
        weights, experts = self.gate(flat)
        y, self.last_expert_counts = self.experts(flat, experts, weights)
        if self.balance_weight and self.training:
            self.balance_terms.append(self._balance_loss(flat, experts, B, T))
        if self.load is not None:
            self._count(experts, B, T)
        y = y.view(B, T, D)
        return y + self.shared_experts(x) if self.shared_experts is not None else y

    def _balance_loss(self, flat: torch.Tensor, experts: torch.Tensor, B: int, T: int) -> torch.Tensor:
        """V3's sequence-wise balance loss summed over sequences: weight * sum_e f_e * P_e, padding left out."""
        E, k = self.gate.n_experts, self.gate.top_k
        scores = F.linear(flat.float(), self.gate.weight.float()).sigmoid()
        share = (scores / scores.sum(-1, keepdim=True)).view(B, T, E)
        chosen = torch.zeros(B * T, E, device=flat.device).scatter_(1, experts, 1.0).view(B, T, E)
        real = self.real_tokens if self.real_tokens is not None and self.real_tokens.shape == (B, T) else \
            torch.ones(B, T, dtype=torch.bool, device=flat.device)
        real = real.unsqueeze(-1).float()
        tokens = real.sum(1).clamp_min(1.0)  # (B, 1)
        f = (chosen * real).sum(1) * E / (k * tokens)  # (B, E)
        p = (share * real).sum(1) / tokens
        return self.balance_weight * (f * p).sum()

    @torch.no_grad()
    def _count(self, experts: torch.Tensor, B: int, T: int) -> None:
        real, self.real_tokens = self.real_tokens, None
        if real is not None and real.shape == (B, T):
            experts = experts[real.reshape(-1)]  # padding is routed too, but is no load to balance
            self.load += torch.bincount(experts.reshape(-1), minlength=len(self.load))
        else:
            self.load += self.last_expert_counts


def moe_layers(model: nn.Module) -> dict[int, MoE]:
    return {i: layer.mlp for i, layer in enumerate(model.model.layers) if isinstance(layer.mlp, MoE)}


@contextlib.contextmanager
def count_loads(model: nn.Module):
    """Within it, MoE layers sum their tokens per expert; yields a dict of layer index -> (E,) counts, on exit."""
    layers, loads = moe_layers(model), {}
    for m in layers.values():
        m.load = torch.zeros(m.experts.gate_up_proj.shape[0], dtype=torch.long, device=m.experts.gate_up_proj.device)
    try:
        yield loads
    finally:
        for i, m in layers.items():
            loads[i], m.load, m.real_tokens = m.load, None, None


@contextlib.contextmanager
def balance_loss(model: nn.Module, weight: float):
    """Within it (weight > 0), DeepSeek-V3 MoE training forwards add the balance loss take_balance_loss collects."""
    layers = [m for m in moe_layers(model).values() if isinstance(m.gate, SigmoidGroupRouter)] if weight else []
    for m in layers:
        m.balance_weight, m.balance_terms = weight, []
    try:
        yield
    finally:
        for m in layers:
            m.balance_weight, m.balance_terms = 0.0, []


def take_balance_loss(model: nn.Module) -> torch.Tensor | float:
    """The balance losses of the forwards since the last call, summed over layers and sequences (0.0 if none)."""
    total = 0.0
    for m in moe_layers(model).values():
        total, m.balance_terms = sum(m.balance_terms, total), []
    return total


def mark_real_tokens(model: nn.Module, real: torch.Tensor) -> None:
    """The forward's (B, T) mask of real tokens, for the load counts of the MoE layers that are counting."""
    for m in moe_layers(model).values():
        if m.load is not None:
            m.real_tokens = real


def mark_real_lengths(model: nn.Module, lengths: list[int], T: int) -> None:
    """mark_real_tokens for right-padded rows of T tokens: row b's first lengths[b] are real."""
    counting = [m for m in moe_layers(model).values() if m.load is not None]
    if counting:
        device = counting[0].load.device
        mark_real_tokens(model, torch.arange(T, device=device) < torch.tensor(lengths, device=device)[:, None])


def add_loads(total: dict, loads: dict) -> dict:
    for i, counts in loads.items():
        total[i] = total[i] + counts if i in total else counts
    return total


@torch.no_grad()
def update_routing_bias(model: nn.Module, loads: dict, speed: float) -> None:
    """DeepSeek-V3's auxiliary-loss-free balancing: bias_e += speed * sign(mean load - load_e)."""
    if not speed:
        return
    for i, m in moe_layers(model).items():
        if i in loads and isinstance(m.gate, SigmoidGroupRouter) and loads[i].sum() > 0:
            load = loads[i].float()
            m.gate.e_score_correction_bias += speed * torch.sign(load.mean() - load)


@torch.no_grad()
def copy_routing_bias(to: nn.Module, source: nn.Module) -> None:
    """The routing biases of source into to (a rollout copy of the policy): buffers, not parameters."""
    for i, m in moe_layers(to).items():
        if isinstance(m.gate, SigmoidGroupRouter):
            m.gate.e_score_correction_bias.copy_(source.model.layers[i].mlp.gate.e_score_correction_bias)


def load_metrics(loads: dict, prefix: str = "moe/") -> dict:
    """load_max_over_mean (worst layer; 1 = even) and routing_entropy (nats, mean over layers); {} if none counted."""
    counts = [c.float() for c in loads.values() if c.sum() > 0]
    if not counts:
        return {}
    loads_ = torch.stack(counts)  # (L, E)
    share = loads_ / loads_.sum(-1, keepdim=True)
    entropy = -(share * share.clamp_min(1e-30).log()).sum(-1)  # (L,)
    worst, mean_entropy = torch.stack([(loads_.max(-1).values / loads_.mean(-1)).max(), entropy.mean()]).tolist()
    return {f"{prefix}load_max_over_mean": worst, f"{prefix}routing_entropy": mean_entropy}


def expert_counts(model: nn.Module) -> dict[int, torch.Tensor]:
    """Tokens routed to each expert (E,) in the last forward, per MoE layer index (padding tokens included)."""
    return {i: m.last_expert_counts for i, m in moe_layers(model).items() if m.last_expert_counts is not None}


def split_experts(state: dict, cfg: ModelConfig) -> dict:
    """r1lab's expert banks and fused shared experts -> transformers' per-expert checkpoint names."""
    out = {}
    for name, t in state.items():
        if name.endswith(".mlp.experts.gate_up_proj"):
            base = name.removesuffix("gate_up_proj")
            for e, w in enumerate(t):
                out[f"{base}{e}.gate_proj.weight"], out[f"{base}{e}.up_proj.weight"] = w.chunk(2, dim=0)
        elif name.endswith(".mlp.experts.down_proj"):
            base = name.removesuffix("down_proj")
            for e, w in enumerate(t):
                out[f"{base}{e}.down_proj.weight"] = w
        elif ".mlp.shared_experts.gate_up_proj." in name:
            gate, up = t.chunk(2, dim=0)
            out[name.replace("gate_up_proj", "gate_proj")], out[name.replace("gate_up_proj", "up_proj")] = gate, up
        else:
            out[name] = t
    return out


def join_experts(state: dict, cfg: ModelConfig) -> dict:
    """transformers' per-expert names -> r1lab's expert banks (the inverse of split_experts)."""
    out = dict(state)
    for i in range(cfg.num_hidden_layers + cfg.mtp_depth):  # the multi-token prediction layers follow the main ones
        p = f"model.layers.{i}.mlp."
        names = [f"{p}experts.{e}.{w}_proj.weight" for e in range(num_experts(cfg)) for w in ("gate", "up", "down")]
        if all(n in out for n in names):
            parts = [out.pop(n) for n in names]
            gate_up = [torch.cat(parts[j : j + 2]) for j in range(0, len(parts), 3)]  # (2F, D) per expert
            out[f"{p}experts.gate_up_proj"] = torch.stack(gate_up)
            out[f"{p}experts.down_proj"] = torch.stack(parts[2::3])
        gate, up = f"{p}shared_experts.gate_proj.weight", f"{p}shared_experts.up_proj.weight"
        if gate in out and up in out:
            out[f"{p}shared_experts.gate_up_proj.weight"] = torch.cat([out.pop(gate), out.pop(up)])
    return out
