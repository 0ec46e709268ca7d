"""Speculative decoding with DeepSeek-V3's multi-token prediction module as the draft (`--speculative mtp`), or a
small model of the same vocabulary (`--speculative draft:DIR`).

Each step the MTP module drafts one token d ~ q from the main model's last hidden state and the token just sampled;
one forward of the main model over [last token, d] verifies it and gives the distribution after d as well. d is kept
with probability min(1, p(d) / q(d)); if it is rejected, the token is drawn from max(0, p - q) renormalised (the
standard rejection-sampling rule of Leviathan et al. and Chen et al., 2023), so every token is distributed exactly as
the main model's own sampler would draw it (greedy: the same tokens). An accepted draft adds the main model's next
token too: two tokens for one forward.

Every step writes two cache columns in every row (the main model's and the module's own one-layer cache); a rejected
draft's column is hidden by the key mask, as left padding is. All rows run until the last one finishes. A draft
model works alike on its own cache, one column ahead of the model's: it reads each token itself, where the module
reads the token after the model's hidden state.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from r1lab.engine.sampling import _RowParams, draw, sampling_probs, uniforms
from r1lab.model.transformer import CausalLM, KVCache


@dataclass
class _Rows:
    """Each row's state between steps: its next token to verify (pending), the draft after it and the draft's
    distribution, the position of pending and the keys that are real in either cache."""

    pending: torch.Tensor  # (B,)
    draft: torch.Tensor  # (B,)
    draft_probs: torch.Tensor  # (B, V)
    positions: torch.Tensor  # (B,)
    key_mask: torch.Tensor  # (B, S) the main model's cache
    draft_key_mask: torch.Tensor  # (B, S) the drafter's cache (the MTP module's or the draft model's)


def generate_speculative(model: CausalLM, prompts: list[list[int]], params: _RowParams, eos: torch.Tensor,
                         pad_id: int, out, draft: CausalLM | None = None) -> dict:
    """Sample completions of prompts (one output row each) with params into out (the engine's _Outputs: tokens,
    logprobs, lengths, stopped), drafting with the model's MTP module or the draft model. Returns each row's counts
    of drafted and accepted tokens, (B,) tensors."""
    temperature, top_k, top_p, generator = params.for_rows(torch.arange(len(prompts), device=eos.device))
    probs = lambda logits: sampling_probs(logits, temperature, top_k, top_p)  # noqa: E731
    log_probs = lambda logits: logits.float().div(_log_temperature(temperature)).log_softmax(-1)  # noqa: E731
    record = _recorder(out, params, eos)
    caches, logits, rows, prompt = _prefill(model, draft, prompts, pad_id, 2 * params.max_steps)
    first = draw(probs(logits), generator)
    running = record(torch.ones_like(first, dtype=torch.bool), first, _gather(log_probs(logits), first))
    rows.pending = first
    rows.draft, rows.draft_probs = _draft(model, draft, rows, caches, prompt, probs, generator)
    drafted, accepted = torch.zeros_like(first), torch.zeros_like(first)
    column = rows.key_mask.shape[1]
    for _ in range(params.max_steps):
        if not bool(running.any()):
            break
        tokens = torch.stack([rows.pending, rows.draft], 1)  # (B, 2)
        positions = torch.stack([rows.positions, rows.positions + 1], 1)
        rows.key_mask = torch.cat([rows.key_mask, torch.ones_like(tokens, dtype=torch.bool)], 1)
        h = model.hidden_states(tokens, None, positions, caches[0], column, rows.key_mask)  # (B, 2, D)
        target = model.lm_head(h)  # (B, 2, V)
        p_next, p_after = probs(target[:, 0]), probs(target[:, 1])
        accept = _accept(rows.draft, rows.draft_probs, p_next, generator)
        token = torch.where(accept, rows.draft, draw(_residual(p_next, rows.draft_probs), generator))
        bonus = draw(p_after, generator)
        drafted, accepted = drafted + running.long(), accepted + (accept & running).long()
        running = record(running, token, _gather(log_probs(target[:, 0]), token))
        # the bonus token only after an accepted draft, in a row the first token did not end
        running = record(running & accept, bonus, _gather(log_probs(target[:, 1]), bonus)) | (running & ~accept)
        rows.key_mask[:, -1] = accept  # a rejected draft's keys are never attended
        rows.draft, rows.draft_probs = _redraft(model, draft, rows, caches, h, token, bonus, accept, column, probs,
                                                generator)
        rows.pending = torch.where(accept, bonus, token)
        rows.positions = rows.positions + 1 + accept.long()
        column += 2
    return {"drafted": drafted, "accepted": accepted}


def _recorder(out, params: _RowParams, eos: torch.Tensor):
    """record(mask, tokens, logprobs): append each masked row's token at its own length; returns the masked rows that
    go on (no end-of-text, under their token limit)."""
    limits = params.limits if params.limits is not None else torch.full_like(out.lengths, params.max_steps)
    rows = torch.arange(len(out.lengths), device=out.lengths.device)

    def record(mask: torch.Tensor, tokens: torch.Tensor, logprobs: torch.Tensor) -> torch.Tensor:
        at = out.lengths.clamp(max=out.tokens.shape[1] - 1)
        out.tokens[rows, at] = torch.where(mask, tokens, out.tokens[rows, at])
        out.logprobs[rows, at] = torch.where(mask, logprobs, out.logprobs[rows, at])
        out.lengths += mask.long()
        stop = mask & torch.isin(tokens, eos) if len(eos) else torch.zeros_like(mask)
        out.stopped |= stop
        return mask & ~stop & (out.lengths < limits)

    return record


def _log_temperature(temperature):
    """The temperature of the recorded log-probs: sample_next's (1 for greedy rows)."""
    if torch.is_tensor(temperature):
        return temperature.masked_fill(temperature <= 0, 1.0)
    return temperature if temperature > 0 else 1.0


def _gather(logp: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    return logp.gather(-1, tokens[:, None]).squeeze(-1)


def _prefill(model: CausalLM, draft: CausalLM | None, prompts, pad_id: int, extra: int):
    """The prompts (left-padded) through the main model into its cache: (caches, last logits, rows, the prompt's
    ids, positions and hidden states for the drafter's prefill)."""
    P = max(len(p) for p in prompts)
    device, dtype = model.lm_head.weight.device, model.lm_head.weight.dtype
    ids = torch.tensor([[pad_id] * (P - len(p)) + list(p) for p in prompts], device=device)  # (B, P)
    key_mask = torch.tensor([[False] * (P - len(p)) + [True] * len(p) for p in prompts], device=device)
    positions = (key_mask.long().cumsum(-1) - 1).clamp(min=0)
    one_layer = dataclasses.replace(model.config, num_hidden_layers=1, mtp_depth=0)
    caches = (KVCache(model.config, len(prompts), P + extra, dtype, device),
              KVCache(draft.config if draft else one_layer, len(prompts), P + extra + 1, dtype, device))
    h = model.hidden_states(ids, None, positions, caches[0], 0, key_mask)  # (B, P, D)
    rows = _Rows(pending=ids[:, -1], draft=ids[:, -1], draft_probs=torch.empty(0), positions=positions[:, -1] + 1,
                 key_mask=key_mask, draft_key_mask=key_mask.clone())
    return caches, model.lm_head(h[:, -1]), rows, (ids, positions, h)


def _draft(model: CausalLM, draft: CausalLM | None, rows: _Rows, caches, prompt, probs, generator):
    """The drafter's prefill: the module reads each prompt position i with the token after it (the prompt's, then
    the first sampled one), a draft model the prompt and the first token; the draft after the first token comes
    from the last position."""
    ids, positions, h = prompt
    if draft is None:
        next_ids = torch.cat([ids[:, 1:], rows.pending[:, None]], 1)  # (B, P)
        out = model.mtp_draft_hidden(h, next_ids, positions, caches[1], 0, rows.draft_key_mask)
    else:
        rows.draft_key_mask = torch.cat([rows.draft_key_mask, torch.ones_like(rows.draft_key_mask[:, :1])], 1)
        out = draft.hidden_states(torch.cat([ids, rows.pending[:, None]], 1), None,
                                  torch.cat([positions, rows.positions[:, None]], 1), caches[1], 0, rows.draft_key_mask)
    q = probs((draft or model).lm_head(out[:, -1]))
    return draw(q, generator), q


def _redraft(model: CausalLM, draft: CausalLM | None, rows: _Rows, caches, h, token, bonus, accept, column: int,
             probs, generator):
    """The drafter over this step's two new tokens: the module reads (pending's hidden state, the token after it)
    and, when the draft was accepted, (the draft's hidden state, the bonus token), a draft model the token and the
    bonus at their own positions; the next draft follows the last real one."""
    rows.draft_key_mask = torch.cat([rows.draft_key_mask, torch.ones_like(h[:, :, 0], dtype=torch.bool)], 1)
    rows.draft_key_mask[:, -1] = accept
    positions, tokens = torch.stack([rows.positions, rows.positions + 1], 1), torch.stack([token, bonus], 1)
    if draft is None:
        out = model.mtp_draft_hidden(h, tokens, positions, caches[1], column, rows.draft_key_mask)
    else:
        out = draft.hidden_states(tokens, None, positions + 1, caches[1], column + 1, rows.draft_key_mask)
    last = torch.where(accept[:, None], out[:, 1], out[:, 0])  # (B, D)
    q = probs((draft or model).lm_head(last))
    return draw(q, generator), q


def _accept(draft: torch.Tensor, q: torch.Tensor, p: torch.Tensor, generator) -> torch.Tensor:
    """(B,) bool: the draft is kept with probability min(1, p(d) / q(d)) (q(d) > 0: d was drawn from q)."""
    u = uniforms(len(draft), generator, draft.device).squeeze(-1)
    return u * _gather(q, draft) < _gather(p, draft)


def _residual(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """max(0, p - q), the distribution of a token after a rejected draft (p itself where it is all zero: p = q,
    where no draft is rejected)."""
    r = (p - q).clamp(min=0)
    return torch.where(r.sum(-1, keepdim=True) > 0, r, p)
