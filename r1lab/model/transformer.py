"""Decoder-only transformer (Qwen2/2.5/3, Llama, DeepSeek-V3, Qwen3-MoE): `forward` for full sequences,
`forward_cached` for the engine's prefill and decode into a preallocated KV cache, and V3's MTP modules."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from r1lab.model import mla, moe
from r1lab.model.architecture import ModelConfig, rope_inverse_frequencies
from r1lab.model.layers import MLP, Attention, RMSNorm, few_rows_product


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


class MTPModule(DecoderLayer):
    """One depth of DeepSeek-V3's multi-token prediction: h' = eh_proj([enorm(emb(t_{i+k})); hnorm(h_i)]), then the
    decoder block a layer at its index would be, then shared_head.norm before the shared output head."""

    def __init__(self, cfg: ModelConfig, index: int):
        super().__init__(cfg, index)
        self.enorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.hnorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * cfg.hidden_size, cfg.hidden_size, bias=False)
        # V3's shared_head: the norm before the output head (the main lm_head, stored as a copy in checkpoints)
        self.shared_head = nn.ModuleDict({"norm": RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)})

    def predict(self, h, next_embeddings, cos, sin, mask, cache=None, start=0):
        """The block's output (B, T, D) before shared_head.norm, from h and the next tokens' embeddings (B, T, D)."""
        x = self.eh_proj(torch.cat([self.enorm(next_embeddings), self.hnorm(h)], dim=-1))
        return self(x, cos, sin, mask, cache, start)


class Backbone(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        # tied: a sparse lookup gradient is added in place into the head's (V, D) one, not another (V, D) tensor
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size, sparse=cfg.tie_word_embeddings)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class KVCache:
    """Preallocated keys and values for every layer: (B, KV, max_len, hd) each; with MLA, mla.cache_shapes."""

    def __init__(self, cfg: ModelConfig, batch: int, max_len: int, dtype: torch.dtype, device: torch.device):
        shape = (batch, cfg.num_key_value_heads, max_len, cfg.head_dim)
        shapes = (shape, shape) if cfg.mla is None else mla.cache_shapes(cfg, batch, max_len)
        self.layers = [tuple(torch.zeros(s, dtype=dtype, device=device) for s in shapes)
                       for _ in range(cfg.num_hidden_layers)]

    def select(self, rows: torch.Tensor) -> None:
        """Keep only these batch rows (expanding a shared prompt to G samples, or dropping finished ones)."""
        self.layers = [(k.index_select(0, rows), v.index_select(0, rows)) for k, v in self.layers]

    def copy_row(self, row: int, start: int, source: KVCache, source_row: int, source_start: int, n: int) -> None:
        """Write n positions of source's row (from source_start) into this cache's row at [start, start + n)."""
        for layer, source_layer in zip(self.layers, source.layers):
            for t, s in zip(layer, source_layer):
                t[row, :, start : start + n] = s[source_row, :, source_start : source_start + n]

    def first_rows(self, n: int) -> KVCache:
        """A cache over this one's first n rows, sharing its memory."""
        view = KVCache.__new__(KVCache)
        view.layers = [tuple(t[:n] for t in layer) for layer in self.layers]
        return view

    def slide(self, shift: int, used: int) -> None:
        """Move positions [shift, used) to [0, used - shift) in every row (columns no row attends any more)."""
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
        self.mtp = nn.ModuleList(MTPModule(cfg, cfg.num_hidden_layers + k) for k in range(cfg.mtp_depth))
        self.register_buffer("inv_freq", rope_inverse_frequencies(cfg), persistent=False)
        self.apply(self._init_weights)
        self.checkpoint_layers = False  # set_activation_checkpointing

    def set_activation_checkpointing(self, on: bool) -> None:
        """Full-sequence training passes keep each layer's input only and recompute the rest in backward."""
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
        """Final normalised hidden states (B, T, D); attention_mask without a cache, key_mask (B, start + T) with it."""
        B, T = input_ids.shape
        if key_mask is None:
            key_mask = attention_mask.bool() if attention_mask is not None else torch.ones(B, T, dtype=torch.bool, device=input_ids.device)
        if position_ids is None:
            position_ids = (key_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -T:]
        x = self.model.embed_tokens(input_ids)
        cos, sin = self._rope(position_ids, x.dtype)
        # Without left padding, plain causal attention (mask None: the fused kernel) is exact
        mask = None if cache is None and attention_mask is None else attention_mask_4d(key_mask, T, start)
        layers = cache.layers if cache is not None else [None] * len(self.model.layers)
        if self.config.moe is not None and mask is not None:  # expert load counts (moe.count_loads) skip padding
            moe.mark_real_tokens(self, key_mask[:, -T:])
        recompute = self.checkpoint_layers and cache is None and torch.is_grad_enabled()
        for layer, kv in zip(self.model.layers, layers):
            x = checkpoint(layer, x, cos, sin, mask, use_reentrant=False) if recompute else \
                layer(x, cos, sin, mask, kv, start)
        return self.model.norm(x)

    def mtp_hidden_states(self, h: torch.Tensor, input_ids: torch.Tensor,
                          depth: int | None = None) -> list[torch.Tensor]:
        """The first `depth` MTP depths' final hidden states of unpadded rows: depth k's (B, T - k, D) at i predicts
        token i + k + 1."""
        out, B = [], h.shape[0]
        for k, module in enumerate(self.mtp[:depth], 1):
            T = h.shape[1] - 1  # the last position has no next token to embed
            cos, sin = self._rope(torch.arange(T, device=h.device).expand(B, T), h.dtype)
            h = module.predict(h[:, :-1], self.model.embed_tokens(input_ids[:, k : k + T]), cos, sin, None)
            out.append(module.shared_head.norm(h))
        return out

    def mtp_draft_hidden(self, h, next_ids, position_ids, cache: KVCache, start: int, key_mask,
                         depth: int = 0) -> torch.Tensor:
        """MTP depth `depth` over T new positions, its keys written into cache layer `depth` at [start, start + T):
        outputs (B, T, D) before shared_head.norm, from h (the previous depth's output, or the main model's)."""
        cos, sin = self._rope(position_ids, h.dtype)
        mask = attention_mask_4d(key_mask, h.shape[1], start)
        return self.mtp[depth].predict(h, self.model.embed_tokens(next_ids), cos, sin, mask, cache.layers[depth], start)

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """Logits of the engine's last positions h (B, D): a decode step's few rows take the installed fast path."""
        y = None if torch.is_grad_enabled() else few_rows_product(h, self.lm_head.weight, self.lm_head.bias)
        return self.lm_head(h) if y is None else y

    def forward(self, input_ids, attention_mask=None, position_ids=None):
        """Logits (B, T, V) for full sequences (training and parity checks)."""
        return self.lm_head(self.hidden_states(input_ids, attention_mask, position_ids))

    def completion_hidden_states(self, prompts, prompt_mask, rows, completions, completion_mask) -> torch.Tensor:
        """Hidden states (B, C, D) predicting each completion token, each distinct prompt (U, P, left-padded) run once;
        completion b (B, C, right-padded) continues prompt rows[b]."""
        U, P = prompts.shape
        C = completions.shape[1]
        cache = KVCache(self.config, U, P + C, self.lm_head.weight.dtype, prompts.device)
        prompt_pos = (prompt_mask.long().cumsum(-1) - 1).clamp(min=0)
        key_mask = torch.cat([prompt_mask[rows], completion_mask], dim=1)  # (B, P + C)
        positions = prompt_pos[rows, -1:] + 1 + torch.arange(C, device=prompts.device)  # (B, C)
        prompt_in = self._layer_inputs(prompts, prompt_pos, prompt_mask, 0)
        completion_in = self._layer_inputs(completions, positions, key_mask, P)
        x_prompt, x_completion = prompt_in[0], completion_in[0]
        # Layer by layer: backward finishes each layer's gradient before the one below (for backward_step.py)
        for layer, (k, v) in zip(self.model.layers, cache.layers):
            x_prompt = self._run_layer(layer, x_prompt, prompt_in, (k, v), 0, prompt_mask)
            expanded = (k.index_select(0, rows), v.index_select(0, rows))  # autograd sums the samples' gradients
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
        """A fixed-shape decode step (CUDA graphs): logits (B, V), keys written at write_pos, mask over the cache."""
        x = self.model.embed_tokens(input_ids)
        cos, sin = self._rope(position_ids, x.dtype)
        for layer, kv in zip(self.model.layers, cache.layers):
            x = layer(x, cos, sin, mask, kv, write_pos)
        return self.head(self.model.norm(x)[:, -1])

    def forward_cached(self, input_ids, position_ids, cache: KVCache, start: int, key_mask) -> torch.Tensor:
        """Logits of the last position only (B, V): prefill when T > 1, one decode step when T == 1."""
        h = self.hidden_states(input_ids, None, position_ids, cache, start, key_mask)
        return self.head(h[:, -1])


def attention_mask_4d(key_mask: torch.Tensor, T: int, start: int) -> torch.Tensor:
    """Boolean (B, 1, T, S) mask: causal, real keys, and always the token itself (a keyless padding row gives NaN)."""
    S = key_mask.shape[1]
    q_pos = torch.arange(start, start + T, device=key_mask.device)[:, None]  # (T, 1)
    k_pos = torch.arange(S, device=key_mask.device)[None, :]  # (1, S)
    causal = k_pos <= q_pos  # (T, S)
    return ((causal[None] & key_mask[:, None, :]) | (k_pos == q_pos)[None])[:, None]
