"""Speculative decoding with DeepSeek-V3's multi-token prediction module as the draft (`--speculative mtp`), or a
small model of the same vocabulary (`--speculative draft:DIR`).

Each step the drafter proposes k tokens d ~ q; one forward of the main model verifies them. A draft is kept with
probability min(1, p(d) / q(d)), the first rejected one replaced by a draw from max(0, p - q) renormalised (Leviathan
et al., 2023), so every token is distributed as the model's own sampler draws it (greedy: the same tokens). A rejected
draft's cache columns are hidden by the key mask. A model with k or more MTP depths drafts the i-th from depth i (as
DeepSeek-V3 trains them); otherwise the drafter is chained on its own output.
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
    """Each row's state between steps."""

    out: torch.Tensor  # (B,) the output row it writes
    pending: torch.Tensor  # (B,) its next token to verify
    drafts: torch.Tensor  # (B, k) the drafts after pending
    draft_probs: torch.Tensor | None  # (B, k, V) their distributions (None when greedy)
    positions: torch.Tensor  # (B,) the position of pending
    key_mask: torch.Tensor  # (B, S) the main model's cache
    draft_key_mask: torch.Tensor  # (B, M, S) the drafter's cache: its M layers (MTP depths; 1 for a draft model)
    last: torch.Tensor | None = None  # (B, M, D) drafting from depths: depth i's output at position p - i

    def select(self, keep: torch.Tensor) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            setattr(self, f.name, value[keep] if value is not None else None)


def generate_speculative(model: CausalLM, prompts: list[list[int]], params: _RowParams, eos: torch.Tensor,
                         pad_id: int, out, draft: CausalLM | None = None, k: int = 1):
    """Sample each prompt's completion into out, drafting k tokens a step; returns (drafted, accepted) per row."""
    temperature, top_k, top_p, generator = params.for_rows(torch.arange(len(prompts), device=eos.device))
    rule = Greedy() if not torch.is_tensor(temperature) and temperature <= 0 else \
        Sampled(temperature, top_k, top_p, generator)
    record = _recorder(out, params, eos)
    caches, logits, rows, prompt = _prefill(model, draft, prompts, pad_id, k, params.max_steps)
    first = rule.first(logits)
    running = record(rows.out, torch.ones_like(first, dtype=torch.bool), first[:, None],
                     gather(rule.log_probs(logits), first)[:, None], torch.ones_like(first))
    rows.pending = first
    draft_logits, state = _draft(model, draft, rows, caches, prompt)
    _propose(model, draft, rule, rows, caches[1], draft_logits, state, k)
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
        logprobs = rule.log_probs(target).gather(-1, emitted[..., None])[..., 0]  # (B, k + 1)
        running = record(rows.out, running, emitted, logprobs, n + 1)  # the kept drafts, then the token after them
        live = int(running.sum())  # one host sync a step; a finished batch drafts no more
        if live == 0:
            break
        kept = columns <= n[:, None]  # (B, k + 1): a rejected draft's keys are never attended
        rows.key_mask[:, column:] = kept
        new = _depth_masks(kept, positions, rows.draft_key_mask.shape[1])  # the drafter reads the verified tokens
        rows.draft_key_mask = torch.cat([rows.draft_key_mask, new], -1)
        column = rows.draft_key_mask.shape[-1] - kept.shape[1]
        if rows.last is not None:
            draft_logits, state = _catch_up_depths(model, caches[1], rows, h, emitted, positions, n, column)
        else:
            draft_logits, state = catch_up(model, draft, caches[1], rows.draft_key_mask[:, 0], h, emitted, positions,
                                           n, column)
        rows.pending = emitted.gather(1, n[:, None]).squeeze(1)
        rows.positions = rows.positions + 1 + n
        _propose(model, draft, rule, rows, caches[1], draft_logits, state, k)
    return drafted, accepted


def _propose(model: CausalLM, draft: CausalLM | None, rule, rows: _Rows, cache: KVCache,
             logits: torch.Tensor, state: torch.Tensor | None, k: int) -> None:
    """rows' k drafts (rows.drafts (B, k)) and their distributions, the first from logits."""
    drafts, probs = [], []
    for i in range(k):
        d, q = rule.propose(logits)
        drafts.append(d)
        probs.append(q)
        if i < k - 1:
            logits, state = _chained(model, draft, rows, cache, state, d, i) if rows.last is None else \
                _next_depth(model, rows, cache, state, torch.stack(drafts, 1), i + 1)
    if k > 1 and rows.last is None:
        rows.draft_key_mask[..., -(k - 1):] = False
    rows.drafts = torch.stack(drafts, 1)
    rows.draft_probs = None if probs[0] is None else torch.stack(probs, 1)


def _chained(model: CausalLM, draft: CausalLM | None, rows: _Rows, cache: KVCache, state, d: torch.Tensor, i: int):
    """The next draft from the drafter fed draft d at the next position (the MTP module its own output as hidden
    state); its keys last this round only, the next catch-up rewrites them from the model's hidden states."""
    column = rows.draft_key_mask.shape[-1]
    rows.draft_key_mask = torch.cat([rows.draft_key_mask, torch.ones_like(d[:, None, None], dtype=torch.bool)], -1)
    h = None if state is None else state[:, None]  # a draft model has no state: it reads d itself
    return catch_up(model, draft, cache, rows.draft_key_mask[:, 0], h, d[:, None], (rows.positions + i)[:, None],
                    torch.zeros_like(d), column)


def _next_depth(model: CausalLM, rows: _Rows, cache: KVCache, state: torch.Tensor | None, drafts: torch.Tensor,
                i: int):
    """Draft i + 1 from MTP depth i, which reads depth i - 1's output (its last real one, then state) and the drafts
    at the positions p - i + 1 .. p its catch-up could not read. Returns (logits, depth i's outputs)."""
    B, T = drafts.shape
    h = rows.last[:, i - 1, None] if state is None else torch.cat([rows.last[:, i - 1, None], state], 1)  # (B, i, D)
    positions = rows.positions[:, None] - i + torch.arange(T, device=drafts.device)
    column = rows.draft_key_mask.shape[-1]
    mine = torch.zeros(B, rows.draft_key_mask.shape[1], T, dtype=torch.bool, device=drafts.device)
    mine[:, i] = positions >= 0  # only depth i reads them, and only this round
    rows.draft_key_mask = torch.cat([rows.draft_key_mask, mine], -1)
    out = model.mtp_draft_hidden(h, drafts, positions.clamp(min=0), cache, column, rows.draft_key_mask[:, i], i)
    rows.draft_key_mask[:, i, column:] = False
    return _mtp_logits(model, out[:, -1], i), out


def _mtp_logits(model: CausalLM, out: torch.Tensor, depth: int = 0) -> torch.Tensor:
    return model.lm_head(model.mtp[depth].shared_head.norm(out))


def _depth_masks(real: torch.Tensor, positions: torch.Tensor, depths: int) -> torch.Tensor:
    """(B, M, T) key masks of the drafter's M layers over T new columns, real ones (B, T) at positions (B, T): MTP
    depth i reads position q - i there, none before the first."""
    return real[:, None] & (positions[:, None] - torch.arange(depths, device=real.device)[None, :, None] >= 0)


def _catch_up_depths(model: CausalLM, cache: KVCache, rows: _Rows, h: torch.Tensor, emitted: torch.Tensor,
                     positions: torch.Tensor, n: torch.Tensor, column: int):
    """catch_up for every MTP depth, depth i reading depth i - 1's output one position behind (depth 0: h). Updates
    rows.last; returns (the first draft's logits, None)."""
    index, last, out = torch.arange(len(n), device=n.device), [], h
    for i in range(rows.last.shape[1]):
        if i:
            h = torch.cat([rows.last[:, i - 1, None], out[:, :-1]], 1)
        out = model.mtp_draft_hidden(h, emitted, (positions - i).clamp(min=0), cache, column,
                                     rows.draft_key_mask[:, i], i)
        last.append(out[index, n])
    rows.last = torch.stack(last, 1)
    return _mtp_logits(model, rows.last[:, 0]), None


class Greedy:
    """Temperature 0: the draft is the drafter's argmax, kept when it is the model's."""

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


@dataclass
class Sampled:
    """The rejection-sampling rule over sample_next's distributions, its uniform numbers from the rows' generators."""

    temperature: float | torch.Tensor
    top_k: int | torch.Tensor
    top_p: float | torch.Tensor
    generator: torch.Generator | list[torch.Generator] | None
    min_p: float | torch.Tensor = 0.0

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        return sampling_probs(logits, self.temperature, self.top_k, self.top_p, self.min_p)

    def log_probs(self, logits: torch.Tensor) -> torch.Tensor:
        return target_log_probs(logits, self.temperature)

    def select(self, keep: torch.Tensor) -> None:
        for name in ("temperature", "top_k", "top_p", "min_p"):
            if torch.is_tensor(value := getattr(self, name)):
                setattr(self, name, value[keep])
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
        """(n, emitted) as Greedy's: draft j kept with probability min(1, p_j(d) / q_j(d)), the first rejected one
        replaced by a draw from max(0, p_j - q_j) renormalised, after k kept the bonus drawn from p_k."""
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
    """record(rows, running, tokens, logprobs, count): append each running row's first count (B,) tokens (B, T) and
    log-probs at its own length, up to an end-of-text and its token limit; returns the rows that go on. The tokens
    not written go to a scratch column, so that no two writes of a step share an index."""
    limits = params.limits if params.limits is not None else torch.full_like(out.lengths, params.max_steps)
    scratch = out.tokens.shape[1]
    out.tokens, out.logprobs = (torch.cat([x, x[:, :1]], 1) for x in (out.tokens, out.logprobs))

    def record(rows: torch.Tensor, running: torch.Tensor, tokens: torch.Tensor, logprobs: torch.Tensor,
               count: torch.Tensor) -> torch.Tensor:
        j = torch.arange(tokens.shape[1], device=tokens.device)
        ends = torch.isin(tokens, eos) if len(eos) else torch.zeros_like(tokens, dtype=torch.bool)
        after_end = ends.cumsum(1) - ends.long() > 0
        lengths = out.lengths[rows, None]
        write = running[:, None] & (j < count[:, None]) & (lengths + j < limits[rows, None]) & ~after_end
        at = torch.where(write, lengths + j, scratch)
        out.tokens[rows[:, None], at] = tokens
        out.logprobs[rows[:, None], at] = logprobs
        out.lengths[rows] += write.sum(1)
        stop = (write & ends).any(1)
        out.stopped[rows] |= stop
        return running & ~stop & (out.lengths[rows] < limits[rows])

    return record


def target_log_probs(logits: torch.Tensor, temperature) -> torch.Tensor:
    """Under softmax(logits / temperature), as sample_next records them (temperature 1 for greedy rows)."""
    if torch.is_tensor(temperature):
        temperature = temperature.masked_fill(temperature <= 0, 1.0).view(-1, *(1,) * (logits.dim() - 1))
    return logits.float().div(temperature).log_softmax(-1)


def gather(logp: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    return logp.gather(-1, tokens[:, None]).squeeze(-1)


def drafter_config(model: CausalLM, draft: CausalLM | None, depths: int = 1):
    """The config of the drafter's cache: the draft model's, or a layer of the model's for each MTP depth used."""
    return draft.config if draft else dataclasses.replace(model.config, num_hidden_layers=depths, mtp_depth=0)


def _prefill(model: CausalLM, draft: CausalLM | None, prompts, pad_id: int, k: int, steps: int):
    """The prompts through the main model: (caches, last logits, rows, (ids, positions, hidden states)). A step
    writes k + 1 columns of the model's cache, at most k + 1 + k(k - 1)/2 of the drafter's."""
    device, dtype = model.lm_head.weight.device, model.lm_head.weight.dtype
    ids, key_mask, positions = left_padded(prompts, pad_id, device)  # (B, P)
    B, P = ids.shape
    depths = k if draft is None and k > 1 and len(model.mtp) >= k else 1  # k drafts from k MTP depths
    caches = (KVCache(model.config, B, P + (k + 1) * steps, dtype, device),
              KVCache(drafter_config(model, draft, depths), B, P + 1 + (k + 1 + k * (k - 1) // 2) * (steps + 1),
                      dtype, device))
    h = model.hidden_states(ids, None, positions, caches[0], 0, key_mask)  # (B, P, D)
    rows = _Rows(out=torch.arange(B, device=device), pending=ids[:, -1], drafts=ids[:, -1:], draft_probs=None,
                 positions=positions[:, -1] + 1, key_mask=key_mask,
                 draft_key_mask=_depth_masks(key_mask, positions, depths),
                 last=h.new_zeros(B, depths, h.shape[-1]) if depths > 1 else None)
    return caches, model.lm_head(h[:, -1]), rows, (ids, positions, h)


def _draft(model: CausalLM, draft: CausalLM | None, rows: _Rows, caches, prompt):
    """The drafter's prefill: the module reads each prompt position with the token after it (the last one's: the
    first sampled token), a draft model the prompt and the first token. Returns (its logits (B, V), its state)."""
    ids, positions, h = prompt
    if draft is None:
        next_ids = torch.cat([ids[:, 1:], rows.pending[:, None]], 1)  # (B, P)
        if rows.last is not None:  # every depth, as after a step whose last position is the prompt's
            last = torch.full_like(rows.pending, ids.shape[1] - 1)
            return _catch_up_depths(model, caches[1], rows, h, next_ids, positions, last, 0)
        out = model.mtp_draft_hidden(h, next_ids, positions, caches[1], 0, rows.draft_key_mask[:, 0])[:, -1]
        return _mtp_logits(model, out), out
    rows.draft_key_mask = torch.cat([rows.draft_key_mask, torch.ones_like(rows.draft_key_mask[..., :1])], -1)
    out = draft.hidden_states(torch.cat([ids, rows.pending[:, None]], 1), None,
                              torch.cat([positions, rows.positions[:, None]], 1), caches[1], 0,
                              rows.draft_key_mask[:, 0])
    return draft.lm_head(out[:, -1]), None


def catch_up(model: CausalLM, draft: CausalLM | None, cache: KVCache, key_mask: torch.Tensor, h: torch.Tensor,
             emitted: torch.Tensor, positions: torch.Tensor, n: torch.Tensor, column: int):
    """The drafter over a step's emitted tokens (B, T) at positions (B, T), each row's first n + 1 real (key_mask
    (B, S) marks them, from column): the module reads the model's hidden state h at each position with the token
    after it, a draft model the tokens one position later. Returns (the next draft's logits (B, V), its state)."""
    rows = torch.arange(len(n), device=n.device)
    if draft is None:
        out = model.mtp_draft_hidden(h, emitted, positions, cache, column, key_mask)[rows, n]
        return _mtp_logits(model, out), out
    out = draft.hidden_states(emitted, None, positions + 1, cache, column, key_mask)[rows, n]
    return draft.lm_head(out), None
