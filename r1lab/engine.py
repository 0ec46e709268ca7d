"""Batched sampling with a KV cache: the one sampler behind RL rollouts, evaluation and chat.

Prompts are left-padded and prefilled once; each prompt's cache is then copied to its `num_samples` rows, so a GRPO
group of G samples pays for one prefill. Finished rows are dropped from the batch as they accumulate, so they stop
costing work. Sampling (temperature, top-k, top-p) is seeded by a torch.Generator and is reproducible.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from r1lab.model import CausalLM, KVCache
from r1lab.tokenizer import Tokenizer


@dataclass
class Sample:
    prompt_index: int
    token_ids: list[int]  # completion tokens, the end-of-text token included when one was sampled
    text: str  # decoded completion, end-of-text dropped, cut right after a stop string
    logprobs: list[float]  # log-prob of each sampled token under softmax(logits / temperature)
    finish_reason: str  # "stop" (end-of-text or stop string) or "length"


@dataclass
class _Batch:
    """The rows still being generated, and where each writes its output."""

    rows: torch.Tensor  # (B,) index into the output list
    key_mask: torch.Tensor  # (B, S) real tokens in the cache
    positions: torch.Tensor  # (B,) position id of the next token
    logits: torch.Tensor  # (B, V) next-token logits
    finished: torch.Tensor  # (B,) rows done but not yet dropped from the batch


def sample_next(logits: torch.Tensor, temperature: float, top_k: int, top_p: float, generator: torch.Generator | None):
    """Sample one token per row. Returns (tokens (B,), logprobs (B,)).

    The log-prob is taken under softmax(logits / temperature) before top-k/top-p truncation: that is the
    distribution the training pass recomputes, so old and new log-probs agree.
    """
    logits = logits.float()
    if temperature <= 0:
        tokens = logits.argmax(-1)
        return tokens, torch.log_softmax(logits, -1).gather(-1, tokens[:, None]).squeeze(-1)
    scaled = logits / temperature  # (B, V)
    logprobs = torch.log_softmax(scaled, -1)
    filtered = scaled
    if top_k and top_k < filtered.shape[-1]:
        kth = filtered.topk(top_k, dim=-1).values[:, -1:]
        filtered = filtered.masked_fill(filtered < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = filtered.sort(-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop_sorted = cum - sorted_logits.softmax(-1) >= top_p  # mass before this token already reaches top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        filtered = filtered.masked_fill(drop, float("-inf"))
    tokens = torch.multinomial(filtered.softmax(-1), 1, generator=generator).squeeze(-1)
    return tokens, logprobs.gather(-1, tokens[:, None]).squeeze(-1)


class Engine:
    def __init__(self, model: CausalLM, tokenizer: Tokenizer):
        self.model = model
        self.tokenizer = tokenizer

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def generate(self, prompt_ids: list[list[int]], *, num_samples: int = 1, max_new_tokens: int = 128,
                 temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, stop_strings: tuple[str, ...] = (),
                 seed: int | None = None, suppress_eos: bool = False) -> list[Sample]:
        """num_samples completions per prompt, prompt-major: prompt i's j-th sample is at i * num_samples + j."""
        if not prompt_ids or any(len(p) == 0 for p in prompt_ids):
            raise ValueError("generate needs at least one prompt, each with at least one token")
        was_training = self.model.training
        self.model.eval()
        generator = None
        if seed is not None:
            generator = torch.Generator(self.device).manual_seed(seed)
        n_out = len(prompt_ids) * num_samples
        tokens_out: list[list[int]] = [[] for _ in range(n_out)]
        logprobs_out: list[list[float]] = [[] for _ in range(n_out)]
        finish = ["length"] * n_out
        batch, cache, start = self._prefill(prompt_ids, num_samples, max_new_tokens)
        eos = torch.tensor(sorted(self.tokenizer.eos_ids), device=self.device, dtype=torch.long)
        for step in range(max_new_tokens):
            if suppress_eos and len(eos):
                batch.logits[:, eos] = float("-inf")
            tokens, logprobs = sample_next(batch.logits, temperature, top_k, top_p, generator)
            batch.finished = self._record(batch, tokens, logprobs, tokens_out, logprobs_out, finish, eos, stop_strings)
            if step == max_new_tokens - 1 or bool(batch.finished.all()):
                break
            batch, tokens = self._drop_finished(batch, cache, tokens)
            batch.key_mask = torch.cat([batch.key_mask, torch.ones_like(batch.key_mask[:, :1])], dim=1)
            batch.logits = self.model.forward_cached(tokens[:, None], batch.positions[:, None], cache, start + step,
                                                     batch.key_mask)
            batch.positions = batch.positions + 1
        self.model.train(was_training)
        return [self._finish(i // num_samples, tokens_out[i], logprobs_out[i], finish[i], stop_strings)
                for i in range(n_out)]

    def _prefill(self, prompt_ids, num_samples, max_new_tokens):
        device, pad = self.device, self.tokenizer.pad_id
        P = max(len(p) for p in prompt_ids)
        ids = torch.tensor([[pad] * (P - len(p)) + list(p) for p in prompt_ids], device=device)  # (N, P) left-padded
        key_mask = torch.tensor([[False] * (P - len(p)) + [True] * len(p) for p in prompt_ids], device=device)
        positions = (key_mask.long().cumsum(-1) - 1).clamp(min=0)
        dtype = next(self.model.parameters()).dtype
        cache = KVCache(self.model.config, len(prompt_ids), P + max_new_tokens, dtype, device)
        logits = self.model.forward_cached(ids, positions, cache, 0, key_mask)  # (N, V)
        rows = torch.arange(len(prompt_ids), device=device).repeat_interleave(num_samples)
        if num_samples > 1:
            cache.select(rows)  # every sample of a prompt starts from the same prefilled cache
        lengths = key_mask.sum(-1)
        batch = _Batch(rows=torch.arange(len(rows), device=device), key_mask=key_mask[rows],
                       positions=lengths[rows], logits=logits[rows],
                       finished=torch.zeros(len(rows), dtype=torch.bool, device=device))
        return batch, cache, P

    def _record(self, batch, tokens, logprobs, tokens_out, logprobs_out, finish, eos, stop_strings):
        """Append each unfinished row's token; return which rows are finished (B,)."""
        hit_eos = torch.isin(tokens, eos) if len(eos) else torch.zeros_like(batch.finished)
        done = batch.finished | hit_eos
        rows = zip(batch.rows.tolist(), tokens.tolist(), logprobs.tolist(), batch.finished.tolist(), hit_eos.tolist())
        for r, (row, tok, lp, was_done, eos_now) in enumerate(rows):
            if was_done:
                continue
            tokens_out[row].append(tok)
            logprobs_out[row].append(lp)
            if eos_now:
                finish[row] = "stop"
            elif stop_strings and self._hits_stop(tokens_out[row], stop_strings):
                finish[row] = "stop"
                done[r] = True
        return done

    def _hits_stop(self, tokens: list[int], stop_strings) -> bool:
        # A stop string of n characters spans at most n tokens, so the tail is enough to see it complete.
        tail = self.tokenizer.decode(tokens[-max(len(s) for s in stop_strings):])
        return any(s in tail for s in stop_strings)

    @staticmethod
    def _drop_finished(batch: _Batch, cache: KVCache, tokens):
        """Compact the batch once a quarter of its rows are finished, so they stop costing compute."""
        n_done = int(batch.finished.sum())
        if n_done == 0 or n_done * 4 < len(batch.finished):
            return batch, tokens
        keep = (~batch.finished).nonzero().squeeze(-1)
        cache.select(keep)
        batch.rows, batch.key_mask, batch.positions = batch.rows[keep], batch.key_mask[keep], batch.positions[keep]
        batch.finished = batch.finished[keep]
        return batch, tokens[keep]

    def _finish(self, prompt_index, tokens, logprobs, reason, stop_strings) -> Sample:
        text = self.tokenizer.decode([t for t in tokens if t not in self.tokenizer.eos_ids])
        for s in stop_strings:
            if s in text:
                text = text[: text.index(s) + len(s)]
        return Sample(prompt_index, tokens, text, logprobs, reason)
