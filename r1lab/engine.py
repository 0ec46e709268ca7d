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
class _Outputs:
    tokens: torch.Tensor  # (N, max_new) sampled ids, valid up to lengths
    logprobs: torch.Tensor  # (N, max_new)
    lengths: torch.Tensor  # (N,)
    stopped: torch.Tensor  # (N,) ended by end-of-text or a stop string (else by length)


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
    scaled = logits / temperature if temperature != 1.0 else logits  # (B, V)
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
    probs = logprobs.exp() if filtered is scaled else filtered.softmax(-1)  # log_softmax is already done
    tokens = _inverse_cdf_sample(probs, generator)
    return tokens, logprobs.gather(-1, tokens[:, None]).squeeze(-1)


def _inverse_cdf_sample(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One draw per row from (B, V) probabilities: one uniform number per row against the cumulative sum.

    torch.multinomial draws an exponential variate per vocabulary entry, which on a CPU costs more than the model's
    decode step itself for vocabularies of a few thousand tokens.
    """
    cdf = probs.cumsum(-1)  # (B, V)
    u = torch.rand(probs.shape[0], 1, generator=generator, device=probs.device, dtype=cdf.dtype) * cdf[:, -1:]
    return torch.searchsorted(cdf, u).squeeze(-1).clamp(max=probs.shape[-1] - 1)


class Engine:
    def __init__(self, model: CausalLM, tokenizer: Tokenizer):
        self.model = model
        self.tokenizer = tokenizer

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.inference_mode()
    def generate(self, prompt_ids: list[list[int]], *, num_samples: int = 1, max_new_tokens: int = 128,
                 temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, stop_strings: tuple[str, ...] = (),
                 seed: int | None = None, suppress_eos: bool = False) -> list[Sample]:
        """num_samples completions per prompt, prompt-major: prompt i's j-th sample is at i * num_samples + j."""
        if not prompt_ids or any(len(p) == 0 for p in prompt_ids):
            raise ValueError("generate needs at least one prompt, each with at least one token")
        was_training = self.model.training
        self.model.eval()
        generator = torch.Generator(self.device).manual_seed(seed) if seed is not None else None
        n_out = len(prompt_ids) * num_samples
        # Outputs stay on the device as tensors until the end: no host round trip per token.
        out = _Outputs(torch.zeros((n_out, max_new_tokens), dtype=torch.long, device=self.device),
                       torch.zeros((n_out, max_new_tokens), device=self.device),
                       torch.zeros(n_out, dtype=torch.long, device=self.device),
                       torch.zeros(n_out, dtype=torch.bool, device=self.device))
        batch, cache, start = self._prefill(prompt_ids, num_samples, max_new_tokens)
        eos = torch.tensor(sorted(self.tokenizer.eos_ids), device=self.device, dtype=torch.long)
        for step in range(max_new_tokens):
            if suppress_eos and len(eos):
                batch.logits[:, eos] = float("-inf")
            tokens, logprobs = sample_next(batch.logits, temperature, top_k, top_p, generator)
            self._record(batch, step, tokens, logprobs, out, eos, stop_strings)
            if step == max_new_tokens - 1 or bool(batch.finished.all()):
                break
            batch, tokens = self._drop_finished(batch, cache, tokens)
            batch.key_mask = torch.cat([batch.key_mask, torch.ones_like(batch.key_mask[:, :1])], dim=1)
            batch.logits = self.model.forward_cached(tokens[:, None], batch.positions[:, None], cache, start + step,
                                                     batch.key_mask)
            batch.positions = batch.positions + 1
        self.model.train(was_training)
        lengths, stopped = out.lengths.tolist(), out.stopped.tolist()
        tokens_out, logprobs_out = out.tokens.tolist(), out.logprobs.tolist()
        return [self._finish(i // num_samples, tokens_out[i][: lengths[i]], logprobs_out[i][: lengths[i]],
                             "stop" if stopped[i] else "length", stop_strings) for i in range(n_out)]

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

    def _record(self, batch: _Batch, step: int, tokens, logprobs, out: "_Outputs", eos, stop_strings) -> None:
        """Write each unfinished row's token; mark rows that sampled end-of-text or completed a stop string."""
        live = ~batch.finished
        rows = batch.rows[live]
        out.tokens[rows, step] = tokens[live]
        out.logprobs[rows, step] = logprobs[live]
        out.lengths[rows] = step + 1
        stop = live & torch.isin(tokens, eos) if len(eos) else torch.zeros_like(live)
        if stop_strings:  # needs the text, so a host round trip; only when stop strings are asked for
            for r in live.nonzero().squeeze(-1).tolist():
                row = int(batch.rows[r])
                if self._hits_stop(out.tokens[row, : step + 1].tolist(), stop_strings):
                    stop[r] = True
        out.stopped[batch.rows[stop]] = True
        batch.finished = batch.finished | stop

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
