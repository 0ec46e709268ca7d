"""Speculative decoding with DeepSeek-V3's multi-token prediction module as the draft (`--speculative mtp`), or a
small model of the same vocabulary (`--speculative draft:DIR`).

Each step the MTP module drafts one token d ~ q from the main model's last hidden state and the token just sampled;
one forward of the main model over [last token, d] verifies it and gives the distribution after d as well. d is kept
with probability min(1, p(d) / q(d)); if it is rejected, the token is drawn from max(0, p - q) renormalised (the
standard rejection-sampling rule of Leviathan et al. and Chen et al., 2023), so every token is distributed exactly as
the main model's own sampler would draw it (greedy: the same tokens). An accepted draft adds the main model's next
token too: two tokens for one forward.

Every step writes two cache columns in every row (the main model's and the module's own one-layer cache); a rejected
draft's column is hidden by the key mask, as left padding is. Finished rows are dropped from the batch (both caches
and every per-row tensor) once a quarter of them are, as the engine's own decoding does. A draft model works alike on its own cache, one column ahead of the model's: it reads each token itself, where the module
reads the token after the model's hidden state. The server's continuous batch drafts by the same rule, row by row
(r1lab/engine/live_batch.py).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from r1lab.engine.sampling import _RowParams, inverse_cdf_sample, sampling_probs, uniforms
from r1lab.engine.slots import left_padded
from r1lab.model.transformer import CausalLM, KVCache


@dataclass
class _Rows:
    """Each row's state between steps: its output row, its next token to verify (pending), the k drafts after it and
    their distributions (None when greedy), the position of pending and the keys that are real in either
    cache."""

    out: torch.Tensor  # (B,) the output row it writes
    pending: torch.Tensor  # (B,)
    drafts: torch.Tensor  # (B, k)
    draft_probs: torch.Tensor | None  # (B, k, V)
    positions: torch.Tensor  # (B,)
    key_mask: torch.Tensor  # (B, S) the main model's cache
    draft_key_mask: torch.Tensor  # (B, S) the drafter's cache (the MTP module's or the draft model's)

    def select(self, keep: torch.Tensor) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            setattr(self, f.name, value[keep] if value is not None else None)


def generate_speculative(model: CausalLM, prompts: list[list[int]], params: _RowParams, eos: torch.Tensor,
                         pad_id: int, out, draft: CausalLM | None = None, k: int = 1) -> dict:
    """Sample completions of prompts (one output row each) with params into out (the engine's _Outputs: tokens,
    logprobs, lengths, stopped), drafting k tokens a step with the model's MTP module or the draft model. Returns
    each row's counts of drafted and accepted tokens, (B,) tensors."""
    temperature, top_k, top_p, generator = params.for_rows(torch.arange(len(prompts), device=eos.device))
    rule = Greedy() if not torch.is_tensor(temperature) and temperature <= 0 else \
        Sampled(temperature, top_k, top_p, generator)
    record = _recorder(out, params, eos)
    caches, logits, rows, prompt = _prefill(model, draft, prompts, pad_id, k, params.max_steps)
    first = rule.first(logits)
    running = record(rows.out, torch.ones_like(first, dtype=torch.bool), first, gather(rule.log_probs(logits), first))
    rows.pending = first
    draft_logits, state = _draft(model, draft, rows, caches, prompt)
    _propose_chain(model, draft, rule, rows, caches[1], draft_logits, state, k)
    drafted, accepted = torch.zeros_like(out.lengths), torch.zeros_like(out.lengths)
    columns = torch.arange(k + 1, device=eos.device)
    live = int(running.sum())
    for _ in range(params.max_steps if live else 0):
        if (len(running) - live) * 4 >= len(running):  # drop the finished rows, as the engine's decoding does
            keep = running.nonzero().squeeze(-1)
            for x in (rows, rule, *caches):
                x.select(keep)
            running = running[keep]
        tokens = torch.cat([rows.pending[:, None], rows.drafts], 1)  # (B, k + 1)
        positions = rows.positions[:, None] + columns
        column = rows.key_mask.shape[1]
        rows.key_mask = torch.cat([rows.key_mask, torch.ones_like(tokens, dtype=torch.bool)], 1)
        h = model.hidden_states(tokens, None, positions, caches[0], column, rows.key_mask)  # (B, k + 1, D)
        target = model.lm_head(h)  # (B, k + 1, V)
        n, emitted = rule.verify(rows.drafts, rows.draft_probs, target)  # n drafts kept, then emitted[:, n]
        drafted[rows.out] += k * running.long()
        accepted[rows.out] += n * running.long()
        target_logp = rule.log_probs(target)
        for j in range(k + 1):  # the kept drafts, then the token after them, until a row ends
            write = running & (n >= j)
            running = record(rows.out, write, emitted[:, j], gather(target_logp[:, j], emitted[:, j])) | \
                (running & ~write)
        live = int(running.sum())  # one host sync a step; a finished batch drafts no more
        if live == 0:
            break
        kept = columns <= n[:, None]  # (B, k + 1): a rejected draft's keys are never attended
        rows.key_mask[:, column:] = kept
        rows.draft_key_mask = torch.cat([rows.draft_key_mask, kept], 1)
        draft_logits, state = catch_up(model, draft, caches[1], rows.draft_key_mask, h, emitted, positions, n,
                                       rows.draft_key_mask.shape[1] - k - 1)
        rows.pending = emitted.gather(1, n[:, None]).squeeze(1)
        rows.positions = rows.positions + 1 + n
        _propose_chain(model, draft, rule, rows, caches[1], draft_logits, state, k)
    return {"drafted": drafted, "accepted": accepted}


def _propose_chain(model: CausalLM, draft: CausalLM | None, rule, rows: _Rows, cache: KVCache,
                   logits: torch.Tensor, state: torch.Tensor | None, k: int) -> None:
    """rows' k drafts: the first from logits, each next one from the drafter fed the one before (the MTP module
    its own output as the hidden state), at the positions after pending's. Their keys are only this round's: the
    next step's catch-up writes those positions again from the model's own hidden states."""
    drafts, probs = [], []
    for i in range(k):
        d, q = rule.propose(logits)
        drafts.append(d)
        probs.append(q)
        if i == k - 1:
            break
        column = rows.draft_key_mask.shape[1]
        rows.draft_key_mask = torch.cat([rows.draft_key_mask, torch.ones_like(d[:, None], dtype=torch.bool)], 1)
        # the drafter's catch-up over one token, d, with no rejected one: the same reading as after a step
        h = None if state is None else state[:, None]  # a draft model has no state: it reads d itself
        logits, state = catch_up(model, draft, cache, rows.draft_key_mask, h, d[:, None],
                                 (rows.positions + i)[:, None], torch.zeros_like(d), column)
    if k > 1:
        rows.draft_key_mask[:, -(k - 1):] = False
    rows.drafts = torch.stack(drafts, 1)
    rows.draft_probs = None if probs[0] is None else torch.stack(probs, 1)


def _mtp_logits(model: CausalLM, out: torch.Tensor) -> torch.Tensor:
    return model.lm_head(model.mtp[0].shared_head.norm(out))


class Greedy:
    """Temperature 0: the draft is the drafter's argmax, kept when it is the model's; no distribution, no draw."""

    def first(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.argmax(-1)

    def log_probs(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.float().log_softmax(-1)  # sample_next's for greedy rows: at temperature 1

    def select(self, keep: torch.Tensor) -> None:
        pass

    def propose(self, logits: torch.Tensor) -> tuple[torch.Tensor, None]:
        return logits.argmax(-1), None

    def verify(self, drafts: torch.Tensor, q: None, target: torch.Tensor):
        """(n, emitted): each row keeps its first n drafts (B,), those equal to the model's argmax, and emits
        emitted[:, : n + 1] (B, k + 1): the kept drafts and the model's token after them."""
        best = target.argmax(-1)  # (B, k + 1)
        return (drafts == best[:, :-1]).long().cumprod(1).sum(1), best


class Sampled:
    """The rejection-sampling rule over sample_next's distributions (temperature, top-k, top-p, min-p), its uniform
    numbers drawn from the rows' generators: one draw per row for a draft, one of three numbers per verification."""

    def __init__(self, temperature, top_k, top_p, generator, min_p=0.0):
        self.temperature, self.top_k, self.top_p, self.generator = temperature, top_k, top_p, generator
        self.min_p = min_p

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        return sampling_probs(logits, self.temperature, self.top_k, self.top_p, self.min_p)

    def log_probs(self, logits: torch.Tensor) -> torch.Tensor:
        return target_log_probs(logits, self.temperature)

    def select(self, keep: torch.Tensor) -> None:
        pick = lambda v: v[keep] if torch.is_tensor(v) else v  # noqa: E731
        self.temperature, self.top_k, self.top_p = pick(self.temperature), pick(self.top_k), pick(self.top_p)
        self.min_p = pick(self.min_p)
        if isinstance(self.generator, list):
            self.generator = [self.generator[i] for i in keep.tolist()]

    def _draw(self, probs: torch.Tensor) -> torch.Tensor:
        return inverse_cdf_sample(probs, uniforms(len(probs), self.generator, probs.device))

    def first(self, logits: torch.Tensor) -> torch.Tensor:
        return self._draw(self.probs(logits))

    def propose(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        q = self.probs(logits)
        return self._draw(q), q

    def verify(self, drafts: torch.Tensor, q: torch.Tensor, target: torch.Tensor):
        """(n, emitted) as Greedy's. Draft j is kept with probability min(1, p_j(d) / q_j(d)) (q_j(d) > 0: d was
        drawn from q_j), up to the first rejected one, which is replaced by a draw from max(0, p_j - q_j)
        renormalised (p_j itself where that is all zero: p_j = q_j, never rejected); after k kept drafts, the bonus
        token is drawn from the model's next distribution. k + 2 uniform numbers per row: the k acceptances, the
        replacement, the bonus."""
        B, k = drafts.shape
        p = torch.stack([self.probs(target[:, j]) for j in range(k + 1)], 1)  # (B, k + 1, V)
        u = uniforms(B, self.generator, drafts.device, k + 2)
        kept = u[:, :k] * q.gather(-1, drafts[..., None])[..., 0] < p[:, :k].gather(-1, drafts[..., None])[..., 0]
        n = kept.long().cumprod(1).sum(1)
        rows = torch.arange(B, device=drafts.device)
        p_n, q_n = p[rows, n], q[rows, n.clamp(max=k - 1)]  # at n = k, p_n is the bonus token's distribution
        residual = (p_n - q_n).clamp(min=0)
        residual = torch.where(residual.sum(-1, keepdim=True) > 0, residual, p_n)
        last = torch.where(n < k, inverse_cdf_sample(residual, u[:, k : k + 1]),
                           inverse_cdf_sample(p_n, u[:, k + 1 : k + 2]))
        emitted = torch.cat([drafts, drafts[:, :1]], 1).scatter(1, n[:, None], last[:, None])
        return n, emitted


def _recorder(out, params: _RowParams, eos: torch.Tensor):
    """record(rows, mask, tokens, logprobs): append each masked row's token to its output row (rows) at its own
    length; returns the masked rows that go on (no end-of-text, under their token limit)."""
    limits = params.limits if params.limits is not None else torch.full_like(out.lengths, params.max_steps)

    def record(rows: torch.Tensor, mask: torch.Tensor, tokens: torch.Tensor, logprobs: torch.Tensor) -> torch.Tensor:
        at = out.lengths[rows].clamp(max=out.tokens.shape[1] - 1)
        out.tokens[rows, at] = torch.where(mask, tokens, out.tokens[rows, at])
        out.logprobs[rows, at] = torch.where(mask, logprobs, out.logprobs[rows, at])
        out.lengths[rows] += mask.long()
        stop = mask & torch.isin(tokens, eos) if len(eos) else torch.zeros_like(mask)
        out.stopped[rows] |= stop
        return mask & ~stop & (out.lengths[rows] < limits[rows])

    return record


def target_log_probs(logits: torch.Tensor, temperature) -> torch.Tensor:
    """Under softmax(logits / temperature), as sample_next records them (temperature 1 for greedy rows);
    temperature: a number above 0, or (B, 1) per row."""
    if torch.is_tensor(temperature):
        temperature = temperature.masked_fill(temperature <= 0, 1.0).view(-1, *(1,) * (logits.dim() - 1))
    return logits.float().div(temperature).log_softmax(-1)


def gather(logp: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    return logp.gather(-1, tokens[:, None]).squeeze(-1)


def drafter_config(model: CausalLM, draft: CausalLM | None):
    """The config of the drafter's cache: the draft model's, or one layer of the model's for its MTP module."""
    return draft.config if draft else dataclasses.replace(model.config, num_hidden_layers=1, mtp_depth=0)


def _prefill(model: CausalLM, draft: CausalLM | None, prompts, pad_id: int, k: int, steps: int):
    """The prompts (left-padded) through the main model into its cache: (caches, last logits, rows, the prompt's
    ids, positions and hidden states for the drafter's prefill). A step writes k + 1 columns of the model's cache
    and 2k of the drafter's (its catch-up and its chained drafts)."""
    device, dtype = model.lm_head.weight.device, model.lm_head.weight.dtype
    ids, key_mask, positions = left_padded(prompts, pad_id, device)  # (B, P)
    P = ids.shape[1]
    caches = (KVCache(model.config, len(prompts), P + (k + 1) * steps, dtype, device),
              KVCache(drafter_config(model, draft), len(prompts), P + 1 + 2 * k * (steps + 1), dtype, device))
    h = model.hidden_states(ids, None, positions, caches[0], 0, key_mask)  # (B, P, D)
    rows = _Rows(out=torch.arange(len(prompts), device=device), pending=ids[:, -1], drafts=ids[:, -1:],
                 draft_probs=None, positions=positions[:, -1] + 1, key_mask=key_mask, draft_key_mask=key_mask.clone())
    return caches, model.lm_head(h[:, -1]), rows, (ids, positions, h)


def _draft(model: CausalLM, draft: CausalLM | None, rows: _Rows, caches, prompt):
    """The drafter's prefill: the module reads each prompt position i with the token after it (the prompt's, then
    the first sampled one), a draft model the prompt and the first token; the draft after the first token comes
    from the last position. Returns (its logits (B, V), the state to chain from)."""
    ids, positions, h = prompt
    if draft is None:
        next_ids = torch.cat([ids[:, 1:], rows.pending[:, None]], 1)  # (B, P)
        out = model.mtp_draft_hidden(h, next_ids, positions, caches[1], 0, rows.draft_key_mask)[:, -1]
        return _mtp_logits(model, out), out
    rows.draft_key_mask = torch.cat([rows.draft_key_mask, torch.ones_like(rows.draft_key_mask[:, :1])], 1)
    out = draft.hidden_states(torch.cat([ids, rows.pending[:, None]], 1), None,
                              torch.cat([positions, rows.positions[:, None]], 1), caches[1], 0, rows.draft_key_mask)
    return draft.lm_head(out[:, -1]), None


def catch_up(model: CausalLM, draft: CausalLM | None, cache: KVCache, key_mask: torch.Tensor, h: torch.Tensor,
             emitted: torch.Tensor, positions: torch.Tensor, n: torch.Tensor, column: int):
    """The drafter over a step's T emitted tokens (B, T), of which each row's first n + 1 are real (key_mask (B, S)
    marks them, from column): the module reads (the model's hidden state h at each verified position, the token
    after it) at those positions (B, T), a draft model the tokens themselves one position later. Returns (the next
    draft's logits (B, V), from each row's last real token, and the state to chain from)."""
    rows = torch.arange(len(n), device=n.device)
    if draft is None:
        out = model.mtp_draft_hidden(h, emitted, positions, cache, column, key_mask)[rows, n]
        return _mtp_logits(model, out), out
    out = draft.hidden_states(emitted, None, positions + 1, cache, column, key_mask)[rows, n]
    return draft.lm_head(out), None
