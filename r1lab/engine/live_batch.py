"""A continuous batch that sequences join and leave between decode steps: the engine under `r1lab serve`.

A sequence is added at any time and takes a row at the next step; step() samples one token for every running one.
Each keeps its own settings and generator, so a seeded sequence samples the same tokens whoever runs beside it. The
layout is Slots' (slots.py), running sequences packed in the first rows. A sequence can be taken out and put back,
here or in another batch, and goes on exactly where it stopped. With an engine that drafts, each row holds its next
token (pending) and a draft after it, verified together by speculative decoding's rule (speculative.py); a sequence
with penalties never drafts. Not thread-safe: one thread owns a LiveBatch.
"""

from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass, field

import torch

from r1lab.engine.engine import Engine
from r1lab.engine.sampling import NO_PENALTIES, Penalties, row_generator, sample_next
from r1lab.engine.slots import Slots, copy_columns, left_padded, prefill, slide_columns
from r1lab.engine.speculative import Greedy, Sampled, catch_up, drafter_config, gather, target_log_probs
from r1lab.model.transformer import KVCache

INITIAL_ROWS = 8  # the cache starts this small and doubles: an idle server holds little memory
INITIAL_COLUMNS = 256
_sequence_ids = itertools.count()  # ids unique across batches: a sequence may move from one to another


@dataclass
class StepToken:
    seq: int  # the id add() returned
    token: int
    logprob: float  # under softmax(logits / temperature) as Engine.generate's, the logits penalised if it asks
    finish_reason: str | None  # "stop" (end-of-text or a stop string) or "length" when this token ended it


@dataclass
class _Parked:
    """A parked sequence's row: its columns of the cache, their key mask, where it stood."""

    cache: KVCache  # one row of span columns
    key_mask: torch.Tensor  # (span,)
    logits: torch.Tensor  # (V,) the next token's, not sampled yet; drafting: the draft's distribution
    position: int
    drafter: tuple | None = None  # drafting: the drafter's cache and key mask, the pending token and the draft


@dataclass(eq=False)
class Sequence:
    """One sequence's prompt, settings, random generator and tokens so far; its keys while out of a row."""

    id: int
    prompt: list[int]
    max_new_tokens: int
    temperature: float
    top_p: float
    top_k: int
    stop_strings: tuple[str, ...]
    generator: torch.Generator
    min_p: float = 0.0
    penalties: tuple[float, float, float] = NO_PENALTIES  # repetition, presence, frequency
    output_start: int = 0  # where in prompt the output begins (a tool turn's prompt holds the completion so far)
    generated: list[int] = field(default_factory=list)
    parked: _Parked | None = None

    @property
    def span(self) -> int:  # columns it needs before the clock when it takes a row
        return len(self.prompt) if self.parked is None else len(self.parked.key_mask)


class LiveBatch(Slots):
    """Sequences running together over one KV cache of at most n_slots rows, and those waiting for a row."""

    def __init__(self, engine: Engine, n_slots: int):
        if n_slots < 1:
            raise ValueError("a live batch needs at least one slot")
        self.engine = engine
        self.rows: list[Sequence] = []  # the running sequences; rows[i] is in cache row i
        self.waiting: deque[Sequence] = deque()  # added or put back, taking a row at the next step
        self.sequences: dict[int, Sequence] = {}  # every sequence not finished or cancelled, by id
        self._params = None
        self.drafting = engine.speculative != "none"
        self.ahead = int(engine.draft is not None)  # a draft model's cache holds one column more: pending's
        self.draft_config = drafter_config(engine.model, engine.draft) if self.drafting else None
        super().__init__(engine.model, n_slots, min(INITIAL_ROWS, n_slots), INITIAL_COLUMNS)

    @property
    def running(self) -> int:
        return len(self.rows)

    @property
    def idle(self) -> bool:
        return not self.rows and not self.waiting

    def add(self, prompt_ids: list[int], *, max_new_tokens: int, temperature: float = 1.0, top_p: float = 1.0,
            top_k: int = 0, min_p: float = 0.0, repetition_penalty: float = 1.0, presence_penalty: float = 0.0,
            frequency_penalty: float = 0.0, seed: int | None = None, stop_strings: tuple[str, ...] = (),
            output_start: int | None = None) -> int:
        """Queue a sequence and return its id (seeded, with no min-p or penalties: Engine.generate's tokens). The
        penalties count the output from prompt_ids[output_start:] on (default: the sampled tokens only)."""
        if not prompt_ids or max_new_tokens < 1:
            raise ValueError("a sequence needs at least one prompt token and max_new_tokens >= 1")
        seq = Sequence(next(_sequence_ids), list(prompt_ids), max_new_tokens, temperature, top_p, top_k,
                       tuple(stop_strings), row_generator(seed, 0, self.device), min_p,
                       (repetition_penalty, presence_penalty, frequency_penalty),
                       len(prompt_ids) if output_start is None else output_start)
        self.put(seq)
        return seq.id

    @torch.inference_mode()
    def cancel(self, seq_id: int) -> None:
        """End a sequence now, running or waiting; an unknown, finished or taken id is ignored."""
        seq = self.sequences.pop(seq_id, None)
        if seq is None:
            return
        if seq in self.rows:
            self._free_row(self.rows.index(seq))
        elif seq in self.waiting:
            self.waiting.remove(seq)

    @torch.inference_mode()
    def take(self, seq_id: int) -> Sequence:
        """Remove a sequence to put() back later, here or into another LiveBatch of the same engine."""
        seq = self.sequences.pop(seq_id)
        if seq in self.waiting:
            self.waiting.remove(seq)
            return seq
        r = self.rows.index(seq)
        start, end = int(self.first_column[r]), self.clock + self.ahead
        seq.parked = _Parked(self._row_copy(self.cache, self.model.config, r, start, self.clock),
                             self.key_mask[r, start : self.clock].clone(), self.logits[r].clone(),
                             int(self.positions[r]))
        if self.drafting:
            seq.parked.drafter = (self._row_copy(self.draft_cache, self.draft_config, r, start, end),
                                  self.draft_key_mask[r, start:end].clone(), int(self.pending[r]), int(self.draft[r]))
        self._free_row(r)
        return seq

    def put(self, seq: Sequence) -> None:
        """A sequence taken from this batch or another waits for a row."""
        self.sequences[seq.id] = seq
        self.waiting.append(seq)

    @torch.inference_mode()
    def step(self) -> list[StepToken]:
        """Give free rows to waiting sequences, sample and feed one token for every running one; return them."""
        self._admit()
        B = len(self.rows)
        if B == 0:
            return []
        if self.drafting:
            return self._step_drafting(B)
        params = self._row_params()
        tokens, logprobs = sample_next(self.logits[:B], *params)  # (B,), (B,)
        if params[-1] is not None:
            params[-1].record(tokens)
        out = [StepToken(seq.id, token, logprob, self._finish_reason(seq, token))
               for seq, token, logprob in zip(self.rows, tokens.tolist(), logprobs.tolist())]
        self._make_room(B, self.first_column[:B], self.clock)  # the clock before a slide: a full cache also grows
        self._decode(tokens)  # rows that just ended are fed too: cheaper than a compaction before the forward
        self._leave([r for r, t in enumerate(out) if t.finish_reason is not None])
        return out

    def _step_drafting(self, B: int) -> list[StepToken]:
        """One forward verifies every row's [pending, draft]; then the drafter drafts again."""
        params = self._row_params()
        self._make_room(B, self.first_column[:B], self.clock + 2)  # a draft model writes up to clock + 2
        c, a = self.clock, self.ahead
        drafted = self.draft[:B] >= 0  # (B,) newcomers' first step and penalised rows have no draft
        tokens = torch.stack([self.pending[:B], self.draft[:B].clamp(min=0)], 1)  # (B, 2)
        positions = torch.stack([self.positions[:B], self.positions[:B] + 1], 1)
        self.key_mask[:B, c : c + 2] = True
        h = self.model.hidden_states(tokens, None, positions, self.cache.first_rows(B), c,
                                     self.key_mask[:B, : c + 2])  # (B, 2, D)
        target = self.model.lm_head(h).float()  # (B, 2, V)
        if params[-1] is not None:  # the penalised rows' next token (the others' logits stay bit for bit)
            target[:, 0] = params[-1].apply(target[:, 0])
        accept, token, bonus = self._verify(target, drafted, params)
        self.key_mask[:B, c + 1] = accept  # a rejected draft's keys are never attended
        self.draft_key_mask[:B, c + a] = True
        self.draft_key_mask[:B, c + a + 1] = accept
        draft_logits = catch_up(self.model, self.engine.draft, self.draft_cache.first_rows(B),
                                self.draft_key_mask[:B, : c + a + 2], h, torch.stack([token, bonus], 1), positions,
                                accept.long(), c + a)[0]
        self._propose(draft_logits, params)
        self.pending[:B] = torch.where(accept, bonus, token)
        self.positions[:B] += 1 + accept.long()
        self.clock += 2
        logp = target_log_probs(target, params[0])  # (B, 2, V) the model's, as the plain step's
        return self._emit(token, accept, bonus, gather(logp[:, 0], token), gather(logp[:, 1], bonus), drafted)

    def _rule(self, params: tuple, rows: torch.Tensor) -> Greedy | Sampled:
        temperature, top_k, top_p, generators, min_p, _ = params
        if not bool((temperature[rows] > 0).any()):
            return Greedy()
        return Sampled(temperature[rows], top_k[rows], top_p[rows], [generators[r] for r in rows.tolist()],
                       min_p[rows])

    def _verify(self, target: torch.Tensor, drafted: torch.Tensor, params: tuple):
        """(accept, the token after pending, the bonus token), each (B,): rows without a draft sample plainly."""
        accept, token = torch.zeros_like(drafted), torch.zeros_like(self.pending[: len(drafted)])
        bonus = token.clone()
        rows, plain = drafted.nonzero().squeeze(-1), (~drafted).nonzero().squeeze(-1)
        if len(rows):
            n, emitted = self._rule(params, rows).verify(self.draft[rows, None], self.logits[rows, None], target[rows])
            accept[rows], token[rows], bonus[rows] = n > 0, emitted[:, 0], emitted[:, 1]
        if len(plain):
            temperature, top_k, top_p, generators, min_p, penalties = params
            token[plain] = sample_next(target[plain, 0], temperature[plain], top_k[plain], top_p[plain],
                                       [generators[r] for r in plain.tolist()], min_p[plain])[0]
            if penalties is not None:
                penalties.record(token)  # only the penalised rows' statistics are ever read: theirs are exact
        return accept, token, bonus

    def _propose(self, draft_logits: torch.Tensor, params: tuple) -> None:
        """Rows without penalties draft their next token (its distribution kept in logits)."""
        B = len(draft_logits)
        self.draft[:B] = -1
        rows = torch.tensor([r for r, s in enumerate(self.rows) if s.penalties == NO_PENALTIES], dtype=torch.long,
                            device=self.device)
        if len(rows):
            draft, q = self._rule(params, rows).propose(draft_logits[rows])
            self.draft[rows] = draft
            self.logits[rows] = q if q is not None else \
                torch.zeros_like(self.logits[rows]).scatter_(-1, draft[:, None], 1.0)

    def _emit(self, token, accept, bonus, token_logp, bonus_logp, drafted) -> list[StepToken]:
        out, ended = [], []
        for r, (seq, t, kept, b, lp, blp) in enumerate(zip(self.rows, token.tolist(), accept.tolist(), bonus.tolist(),
                                                           token_logp.tolist(), bonus_logp.tolist())):
            out.append(StepToken(seq.id, t, lp, self._finish_reason(seq, t)))
            if kept and out[-1].finish_reason is None:
                out.append(StepToken(seq.id, b, blp, self._finish_reason(seq, b)))
            if out[-1].finish_reason is not None:
                ended.append(r)
        counts = self.engine.speculative_counts
        counts["drafted"] += int(drafted.sum())
        counts["accepted"] += int(accept.sum())
        self._leave(ended)
        return out

    def _leave(self, ended: list[int]) -> None:
        # from the last row on, so that a row moved into a freed one is never one that ended
        for r in reversed(ended):
            del self.sequences[self.rows[r].id]
            self._free_row(r)

    def _finish_reason(self, seq: Sequence, token: int) -> str | None:
        seq.generated.append(token)
        if token in self.engine.tokenizer.eos_ids:
            return "stop"
        if seq.stop_strings and self.engine.hits_stop(seq.generated, seq.stop_strings):
            return "stop"
        return "length" if len(seq.generated) >= seq.max_new_tokens else None

    def _row_params(self) -> tuple:
        """sample_next's (temperature, top_k, top_p, generators, min_p, penalties), rebuilt when the rows change."""
        if self._params is None:
            column = lambda values, dtype: torch.tensor(values, dtype=dtype, device=self.device)[:, None]  # noqa: E731
            self._params = (column([s.temperature for s in self.rows], torch.float32),
                            column([s.top_k for s in self.rows], torch.long),
                            column([s.top_p for s in self.rows], torch.float32),
                            [s.generator for s in self.rows],
                            column([s.min_p for s in self.rows], torch.float32),
                            self._penalties())
        return self._params

    def _penalties(self) -> Penalties | None:
        if all(s.penalties == NO_PENALTIES for s in self.rows):
            return None
        counted = [s if s.penalties != NO_PENALTIES else None for s in self.rows]
        return Penalties.build([s.penalties for s in self.rows],
                               [s.prompt + s.generated if s else [] for s in counted],
                               [s.prompt[s.output_start:] + s.generated if s else [] for s in counted],
                               self.logits.shape[1], self.device)

    def _admit(self) -> None:
        """The waiting sequences take the free rows: new prompts prefilled together, parked ones copied back."""
        n = min(self.n_slots - len(self.rows), len(self.waiting))
        if n <= 0:
            return
        newcomers = [self.waiting.popleft() for _ in range(n)]
        span = max(s.span for s in newcomers)  # drafting, a fresh one's is one less: room to spare
        self._make_room(len(self.rows), self.first_column[: len(self.rows)], span, new_rows=n)
        self.clock = max(self.clock, span)  # running rows see a masked gap: harmless
        fresh = [s for s in newcomers if s.parked is None]
        if fresh and not self.drafting:
            cache, logits, key_mask = prefill(self.model, [s.prompt for s in fresh], self.engine.tokenizer.pad_id)
        elif fresh:
            cache, draft_cache, P = self._prefill_drafting([s.prompt for s in fresh])
        for seq in newcomers:
            r = len(self.rows)
            if seq.parked is None and not self.drafting:
                j = fresh.index(seq)
                self._enter(r, cache, j, key_mask.shape[1] - seq.span, seq.span, logits[j], seq.span)
            elif seq.parked is None:  # its last prompt token is pending, with no draft
                j, n = fresh.index(seq), seq.span - 1
                self._enter(r, cache, j, P - n, n, 0.0, n)
                self._enter_drafter(r, draft_cache, j, P - n, n + self.ahead)
                self.pending[r], self.draft[r] = seq.prompt[-1], -1
            else:
                p, seq.parked = seq.parked, None
                self._enter(r, p.cache, 0, 0, len(p.key_mask), p.logits, p.position, p.key_mask)
                if self.drafting:
                    d_cache, d_mask, self.pending[r], self.draft[r] = p.drafter
                    self._enter_drafter(r, d_cache, 0, 0, len(d_mask), d_mask)
            self.rows.append(seq)
        self._params = None

    def _prefill_drafting(self, prompts: list[list[int]]):
        """The model reads each prompt but its last token (the first step feeds it), the MTP module those positions
        with the token after each, a draft model the whole prompt. Returns both caches (P, P + ahead columns), P."""
        pad, P = self.engine.tokenizer.pad_id, max(1, max(len(p) for p in prompts) - 1)
        ids, key_mask, positions = left_padded([p[:-1] for p in prompts], pad, self.device, P)  # (n, P)
        cache = KVCache(self.model.config, len(prompts), P, self.dtype, self.device)
        draft_cache = KVCache(self.draft_config, len(prompts), P + self.ahead, self.dtype, self.device)
        h = self.model.hidden_states(ids, None, positions, cache, 0, key_mask)  # (n, P, D)
        if self.engine.draft is None:
            next_ids = left_padded([p[1:] for p in prompts], pad, self.device, P)[0]
            self.model.mtp_draft_hidden(h, next_ids, positions, draft_cache, 0, key_mask)
        else:
            ids, key_mask, positions = left_padded(prompts, pad, self.device, P + 1)
            self.engine.draft.hidden_states(ids, None, positions, draft_cache, 0, key_mask)
        return cache, draft_cache, P

    def _enter_drafter(self, r: int, source: KVCache, source_row: int, source_start: int, n: int,
                       key_mask: torch.Tensor | bool = True) -> None:
        start = int(self.first_column[r])
        self.draft_cache.copy_row(r, start, source, source_row, source_start, n)
        self.draft_key_mask[r] = False
        self.draft_key_mask[r, start : start + n] = key_mask

    def _row_copy(self, cache: KVCache, config, r: int, start: int, end: int) -> KVCache:
        copy = KVCache(config, 1, end - start, self.dtype, self.device)
        copy.copy_row(0, 0, cache, r, start, end - start)
        return copy

    def _slide(self, B: int, shift: int) -> None:
        if self.drafting:
            slide_columns(self.draft_cache.first_rows(B), self.draft_key_mask[:B], shift, self.clock + self.ahead)
        super()._slide(B, shift)

    def _resize(self, n_rows: int, width: int) -> None:
        old = (self.draft_cache, self.draft_key_mask, self.pending, self.draft) \
            if self.drafting and self.cache is not None else None
        super()._resize(n_rows, width)
        if not self.drafting:
            return
        self.draft_cache = KVCache(self.draft_config, n_rows, width, self.dtype, self.device)
        self.draft_key_mask = torch.zeros(n_rows, width, dtype=torch.bool, device=self.device)
        self.pending = torch.zeros(n_rows, dtype=torch.long, device=self.device)
        self.draft = torch.full((n_rows,), -1, dtype=torch.long, device=self.device)
        if old is not None:
            cache, key_mask, pending, draft = old
            n, c = key_mask.shape
            copy_columns(self.draft_cache, cache, c)
            self.draft_key_mask[:n, :c], self.pending[:n], self.draft[:n] = key_mask, pending, draft

    def _free_row(self, r: int) -> None:
        """Row r leaves the batch; the last row's sequence moves into it."""
        last = len(self.rows) - 1
        if r != last:
            start = int(self.first_column[last])
            self.cache.copy_row(r, start, self.cache, last, start, self.clock - start)
            moved = (self.key_mask, self.first_column, self.positions, self.logits)
            if self.drafting:
                self.draft_cache.copy_row(r, start, self.draft_cache, last, start, self.clock + self.ahead - start)
                moved += (self.draft_key_mask, self.pending, self.draft)
            for t in moved:
                t[r] = t[last]
            self.rows[r] = self.rows[last]
        self.rows.pop()
        self._params = None
