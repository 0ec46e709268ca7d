"""Choosing the next token: temperature, top-k, top-p and min-p per row, from seeded generators, after vLLM's
penalties; and the per-step seeds that make runs resumable and reproducible.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch


def step_seed(seed: int, step: int, purpose: str) -> int:
    """A seed per (run seed, step, purpose): a resumed run draws exactly what an uninterrupted one would."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{step}/{purpose}".encode()).digest()[:4], "little")


Param = float | torch.Tensor  # one value for the whole batch, or a (B, 1) tensor with one value per row


def sample_next(logits: torch.Tensor, temperature: Param, top_k: int | torch.Tensor, top_p: Param,
                generator: torch.Generator | list[torch.Generator] | None, min_p: Param = 0.0,
                penalties: Penalties | None = None):
    """Sample one token per row: (tokens (B,), logprobs (B,)).

    The log-prob is under softmax(logits / temperature) before truncation (of the penalised logits, with penalties):
    the distribution the training pass recomputes. Rows at temperature 0 are greedy, their log-prob at temperature 1.
    Each parameter is a number or a (B, 1) tensor; generator is one for the batch or one per row.
    """
    logits = logits.float()
    if penalties is not None:  # before temperature, as vLLM and transformers apply them
        logits = penalties.apply(logits)
    if not torch.is_tensor(temperature) and temperature <= 0:
        return _greedy(logits)
    greedy_rows, probs, keep = _distribution(logits, temperature, top_k, top_p, min_p)
    tokens = inverse_cdf_sample(probs * keep if keep is not None else probs,
                                 uniforms(len(probs), generator, probs.device))
    logprobs = probs.gather(-1, tokens[:, None]).squeeze(-1).log()  # a sampled token's probability is never 0
    if greedy_rows is not None and greedy_rows.any():
        greedy_tokens, greedy_logprobs = _greedy(logits)
        tokens = torch.where(greedy_rows.squeeze(-1), greedy_tokens, tokens)
        logprobs = torch.where(greedy_rows.squeeze(-1), greedy_logprobs, logprobs)
    return tokens, logprobs


NO_PENALTIES = (1.0, 0.0, 0.0)  # (repetition, presence, frequency) that change nothing


@dataclass
class Penalties:
    """vLLM's repetition and OpenAI's presence and frequency penalties per row, with the token statistics they read.
    A row at the neutral values (1, 0, 0) keeps its logits bit for bit."""

    repetition: torch.Tensor  # (B, 1) a prompt or output token's logit is divided by it when positive, else multiplied
    presence: torch.Tensor  # (B, 1) subtracted from the logit of each token the output holds
    frequency: torch.Tensor  # (B, 1) subtracted once for each time the output holds the token
    seen: torch.Tensor  # (B, V) bool: the token is in the prompt or the output
    counts: torch.Tensor  # (B, V) how many times the output holds the token

    @classmethod
    def build(cls, values: list[tuple[float, float, float]], contexts: list[list[int]], outputs: list[list[int]],
              vocab_size: int, device) -> Penalties:
        """Per row: (repetition, presence, frequency), prompt + output tokens, and output tokens."""
        B = len(values)
        seen = torch.zeros(B, vocab_size, dtype=torch.bool, device=device)
        counts = torch.zeros(B, vocab_size, device=device)
        for r, (context, output) in enumerate(zip(contexts, outputs)):
            if context:
                seen[r, torch.tensor(context, device=device)] = True
            if output:
                counts[r].index_add_(0, torch.tensor(output, device=device), torch.ones(len(output), device=device))
        per_row = torch.tensor(values, dtype=torch.float32, device=device).view(B, 3, 1)
        return cls(*per_row.unbind(1), seen, counts)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """The penalised logits (B, V), in vLLM's order: repetition, then frequency and presence."""
        repeated = torch.where(logits > 0, logits / self.repetition, logits * self.repetition)
        logits = torch.where(self.seen, repeated, logits)
        return logits - self.frequency * self.counts - self.presence * (self.counts > 0)

    def record(self, tokens: torch.Tensor) -> None:
        self.seen.scatter_(1, tokens[:, None], True)
        self.counts.scatter_add_(1, tokens[:, None], torch.ones_like(self.counts[:, :1]))


def _distribution(logits: torch.Tensor, temperature: Param, top_k, top_p, min_p):
    """(the greedy rows (B, 1) or None, softmax(logits / temperature) (B, V), the truncation mask or None)."""
    greedy_rows = temperature <= 0 if torch.is_tensor(temperature) else None
    if greedy_rows is not None:
        temperature = temperature.masked_fill(greedy_rows, 1.0)
    scaled = logits / temperature if torch.is_tensor(temperature) or temperature != 1.0 else logits  # (B, V)
    probs = scaled.softmax(-1)  # on a CPU the fused softmax costs less than a separate max and exp
    return greedy_rows, probs, _truncation_mask(scaled, probs, top_k, top_p, min_p)


def _greedy(logits: torch.Tensor):
    tokens = logits.argmax(-1)
    return tokens, torch.log_softmax(logits, -1).gather(-1, tokens[:, None]).squeeze(-1)


def _truncation_mask(scaled, weights, top_k, top_p, min_p=0.0) -> torch.Tensor | None:
    """(B, V) the tokens top-k, min-p and top-p keep (None: all); top-p after the others, as in vLLM."""
    V = scaled.shape[-1]
    keep = None
    k_max = int(top_k.max()) if torch.is_tensor(top_k) else top_k
    if 0 < k_max < V:
        kth = scaled.topk(k_max, dim=-1).values  # (B, k_max)
        if torch.is_tensor(top_k):  # per-row k; 0 (or >= V) keeps every token
            kth = kth.gather(-1, (top_k.clamp(1, k_max) - 1)).masked_fill((top_k <= 0) | (top_k >= V), float("-inf"))
        else:
            kth = kth[:, -1:]
        keep = scaled >= kth
    if bool((min_p > 0).any()) if torch.is_tensor(min_p) else min_p > 0:
        # min-p: a token at least min_p times as probable as the most probable one (0 keeps every token)
        likely = weights >= min_p * weights.amax(-1, keepdim=True)
        keep = likely if keep is None else keep & likely
    truncating = bool((top_p < 1.0).any()) if torch.is_tensor(top_p) else top_p < 1.0
    if truncating:
        nucleus = _nucleus(weights * keep if keep is not None else weights, top_p)
        keep = nucleus if keep is None else keep & nucleus
    return keep


NUCLEUS_FIRST_K = 1024


def _nucleus(probs: torch.Tensor, top_p: Param) -> torch.Tensor:
    """(B, V) bool: each row's most probable tokens while the mass before each is below top_p.

    Sorting a 150k vocabulary costs twice a CPU decode step's LM head, and a trained policy's nucleus is a few
    tokens: the whole row is sorted only when the NUCLEUS_FIRST_K most probable do not reach top_p."""
    V = probs.shape[-1]
    total = probs.sum(-1, keepdim=True)
    k = min(NUCLEUS_FIRST_K, V)
    top, order = probs.topk(k, dim=-1)  # descending
    if k < V and not bool(((top.sum(-1, keepdim=True) / total) >= top_p).all()):
        top, order = probs.sort(-1, descending=True)
    top = top / total
    drop = (top.cumsum(-1) - top) >= top_p  # the mass before it already reaches top_p
    if torch.is_tensor(top_p):
        drop &= top_p < 1.0  # rounding must not truncate rows that asked for no top-p
    return torch.zeros_like(probs, dtype=torch.bool).scatter(-1, order, ~drop)


def uniforms(n: int, generator, device, per_row: int = 1) -> torch.Tensor:
    """(n, per_row) uniform draws: from one batch generator, or per_row from each row's own."""
    if isinstance(generator, list):
        return torch.stack([torch.rand(per_row, generator=g, device=device) for g in generator])
    return torch.rand(n, per_row, generator=generator, device=device)


def inverse_cdf_sample(weights: torch.Tensor, u: torch.Tensor, block: int = 64) -> torch.Tensor:
    """One draw per row from (B, V) non-negative weights, given a uniform number per row (B, 1).

    A two-level inverse CDF, over blocks of `block` tokens, then inside the chosen one: on a CPU torch.multinomial or
    a cumulative sum over the whole vocabulary costs about as much as the model's decode step.
    """
    B, V = weights.shape
    n_blocks = -(-V // block)
    w = torch.nn.functional.pad(weights, (0, n_blocks * block - V)).view(B, n_blocks, block)
    block_mass = w.sum(-1)  # (B, n_blocks)
    block_cdf = block_mass.cumsum(-1)
    target = u.to(block_cdf.dtype) * block_cdf[:, -1:]  # (B, 1)
    b = torch.searchsorted(block_cdf, target, side="right").clamp(max=n_blocks - 1)  # (B, 1)
    inner = w[torch.arange(B, device=w.device), b.squeeze(-1)].cumsum(-1)  # (B, block)
    rest = target - (block_cdf.gather(-1, b) - block_mass.gather(-1, b))
    j = torch.searchsorted(inner, rest, side="right")
    last_positive = (inner < inner[:, -1:]).sum(-1, keepdim=True)  # rounding must not land on a zero-weight token
    return (b * block + torch.minimum(j, last_positive)).squeeze(-1).clamp(max=V - 1)


@dataclass
class _RowParams:
    """Sampling settings as scalars (the fast path) or per output row (N, 1) tensors."""

    temperature: float | torch.Tensor
    top_k: int | torch.Tensor
    top_p: float | torch.Tensor
    generator: torch.Generator | list[torch.Generator] | None
    limits: torch.Tensor | None  # (N,) max new tokens per output row, None when all share max_steps
    max_steps: int

    @classmethod
    def build(cls, n_prompts: int, num_samples: int, device, *, max_new_tokens, temperature, top_p, top_k, seed):
        def per_row(value, dtype):
            if not isinstance(value, (list, tuple)):
                return value
            if len(value) != n_prompts:
                raise ValueError(f"got {len(value)} per-prompt values for {n_prompts} prompts")
            return torch.tensor(value, dtype=dtype, device=device).repeat_interleave(num_samples)[:, None]

        limits = per_row(max_new_tokens, torch.long)
        max_steps = int(limits.max()) if torch.is_tensor(limits) else int(max_new_tokens)
        if max_steps < 1:
            raise ValueError("max_new_tokens must be at least 1")
        if isinstance(seed, (list, tuple)):  # sample j of prompt i: its own stream, seeded by (seed_i, j)
            if len(seed) != n_prompts:
                raise ValueError(f"got {len(seed)} per-prompt seeds for {n_prompts} prompts")
            generator = [row_generator(s, j, device) for s in seed for j in range(num_samples)]
        else:
            generator = torch.Generator(device).manual_seed(seed) if seed is not None else None
        return cls(per_row(temperature, torch.float32), per_row(top_k, torch.long), per_row(top_p, torch.float32),
                   generator, limits.squeeze(-1) if torch.is_tensor(limits) else None, max_steps)

    def for_rows(self, rows: torch.Tensor) -> tuple:
        """(temperature, top_k, top_p, generator) for the batch's current rows."""
        pick = lambda v: v[rows] if torch.is_tensor(v) else v  # noqa: E731
        gen = [self.generator[r] for r in rows.tolist()] if isinstance(self.generator, list) else self.generator
        return pick(self.temperature), pick(self.top_k), pick(self.top_p), gen


def row_generator(seed: int | None, sample: int, device) -> torch.Generator:
    generator = torch.Generator(device)
    if seed is None:
        generator.seed()  # this row asked for no seed: a fresh non-deterministic stream
    else:
        generator.manual_seed((seed * 1_000_003 + sample) % 2**63)
    return generator


def sampling_probs(logits: torch.Tensor, temperature: Param, top_k: int | torch.Tensor, top_p: Param,
                   min_p: Param = 0.0) -> torch.Tensor:
    """The distribution sample_next draws from, renormalised (one-hot when greedy): speculative decoding's."""
    logits = logits.float()
    t = temperature if torch.is_tensor(temperature) else \
        torch.full((len(logits), 1), float(temperature), device=logits.device)
    greedy, probs, keep = _distribution(logits, t, top_k, top_p, min_p)
    if keep is not None:
        probs = probs * keep
        probs = probs / probs.sum(-1, keepdim=True)
    one_hot = torch.zeros_like(probs).scatter_(-1, logits.argmax(-1, keepdim=True), 1.0)
    return torch.where(greedy, one_hot, probs)
