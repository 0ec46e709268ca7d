"""Continuous batching: sequences in the rows of one KV cache, a finished one's row going to a waiting one.

Slots is the layout of Engine.generate's FixedSlots and the server's LiveBatch: every row writes its next key at the
same cache column (the clock), so a decode step is one forward over the rows. A newcomer's keys end just before the
clock, its key mask hiding the rest of its row; columns no row attends any more are slid out from time to time
(rotary positions travel with the keys, so a slide changes nothing).
"""

from __future__ import annotations

from collections import deque
from typing import Callable

import torch

from r1lab.engine.static_decode import StaticDecoder
from r1lab.model.transformer import CausalLM, KVCache

SLIDE_MIN_COLUMNS = 32  # slide dead columns out only once there are this many (a slide copies the whole cache)
SLIDE_SHARE = 4  # ... and they are at least 1 / SLIDE_SHARE of the columns in use


def left_padded(prompts: list[list[int]], pad_id: int, device, width: int = 0):
    """The prompts left-padded to width (at least the longest): ids, key mask and position ids, each (n, P)."""
    P = max(width, *(len(p) for p in prompts))
    ids = torch.tensor([[pad_id] * (P - len(p)) + list(p) for p in prompts], device=device)  # (n, P)
    key_mask = torch.tensor([[False] * (P - len(p)) + [True] * len(p) for p in prompts], device=device)
    return ids, key_mask, (key_mask.long().cumsum(-1) - 1).clamp(min=0)


def prefill(model: CausalLM, prompts: list[list[int]], pad_id: int, extra_columns: int = 0):
    """One forward over the prompts, left-padded: their cache (P + extra_columns), last logits and key mask."""
    device = next(model.parameters()).device
    ids, key_mask, positions = left_padded(prompts, pad_id, device)
    P = ids.shape[1]
    cache = KVCache(model.config, len(prompts), P + extra_columns, next(model.parameters()).dtype, device)
    return cache, model.forward_cached(ids, positions, cache, 0, key_mask), key_mask


def drop_finished(batch, tokens: torch.Tensor, cache: KVCache, decoder: StaticDecoder | None, names: tuple[str, ...]):
    """Once a quarter of batch's rows are finished (half with a static decoder, captured anew), drop them from its
    tensors (names, and finished), the cache (or the decoder) and tokens. Returns (tokens, decoder)."""
    n_done = int(batch.finished.sum())
    if n_done == 0 or n_done * (4 if decoder is None else 2) < len(batch.finished):
        return tokens, decoder
    keep = (~batch.finished).nonzero().squeeze(-1)
    for name in (*names, "finished"):
        setattr(batch, name, getattr(batch, name)[keep])
    if decoder is None:
        cache.select(keep)
    else:
        decoder = decoder.select(keep)
    return tokens[keep], decoder


def copy_columns(new: KVCache, old: KVCache, columns: int) -> None:
    """old's first columns into new's first rows (a larger cache)."""
    for layer, old_layer in zip(new.layers, old.layers):
        for t, s in zip(layer, old_layer):
            t[: len(s), :, :columns] = s[:, :, :columns]


def slide_columns(cache: KVCache, key_mask: torch.Tensor, shift: int, used: int) -> None:
    """Columns [shift, used) of the cache and its key mask to [0, used - shift); none real after."""
    cache.slide(shift, used)
    key_mask[:, : used - shift] = key_mask[:, shift:used].clone()
    key_mask[:, used - shift :] = False


class Slots:
    """The rows' buffers (KV cache, key_mask, first_column, positions, logits) and the clock."""

    def __init__(self, model: CausalLM, n_slots: int, n_rows: int, width: int, floor: int = 0):
        """At most n_slots rows; buffers of n_rows x width to start with; the clock never slides below floor."""
        self.model, self.n_slots, self.clock, self.floor = model, n_slots, floor, floor
        self.device, self.dtype = next(model.parameters()).device, next(model.parameters()).dtype
        self.decoder: StaticDecoder | None = None
        self.cache: KVCache | None = None
        self._resize(n_rows, width)

    def _enter(self, r: int, source: KVCache, source_row: int, source_start: int, span: int, logits: torch.Tensor,
               position: int, key_mask: torch.Tensor | bool = True) -> None:
        """Row r takes span columns of source's row, ending just before the clock."""
        start = self.clock - span
        self.cache.copy_row(r, start, source, source_row, source_start, span)
        self.key_mask[r] = False
        self.key_mask[r, start : self.clock] = key_mask
        self.first_column[r], self.positions[r], self.logits[r] = start, position, logits

    def _decode(self, tokens: torch.Tensor) -> None:
        """Feed the first len(tokens) rows their next token, written at the clock."""
        B = len(tokens)
        if self.decoder is not None:  # it writes at the clock and unmasks that column itself
            self.logits[:B] = self.decoder.step(tokens, self.positions[:B])
        else:
            self.key_mask[:B, self.clock] = True
            self.logits[:B] = self.model.forward_cached(tokens[:, None], self.positions[:B, None],
                                                        self.cache.first_rows(B), self.clock,
                                                        self.key_mask[:B, : self.clock + 1])  # (B, V)
        self.clock += 1
        self.positions[:B] += 1

    def _make_room(self, B: int, starts: torch.Tensor, clock_at_least: int = 0, new_rows: int = 0) -> None:
        """Room for the clock at clock_at_least and for new_rows rows beside the first B: the columns before starts
        slid out when many (static decoder: only when full), the buffers doubled when still short."""
        shift = min(int(starts.min()) if len(starts) else self.clock, self.clock - self.floor)
        width = self.key_mask.shape[1]
        full = max(self.clock, clock_at_least) + 1 > width
        if shift and (full or (self.decoder is None and shift >= SLIDE_MIN_COLUMNS
                               and shift * SLIDE_SHARE >= self.clock)):
            self._slide(B, shift)
            self.first_column[:B] -= shift
            self.clock -= shift
            if self.decoder is not None:
                self.decoder.write_pos.fill_(self.clock)  # the next step writes at the slid clock
        columns, rows, n_rows = max(self.clock, clock_at_least) + 1, B + new_rows, self.key_mask.shape[0]
        if columns > width or rows > n_rows:  # doubling, so a long run resizes only a few times
            self._resize(n_rows if rows <= n_rows else min(self.n_slots, max(rows, 2 * n_rows)),
                         width if columns <= width else max(columns, 2 * width))

    def _slide(self, B: int, shift: int) -> None:
        slide_columns(self.cache.first_rows(B), self.key_mask[:B], shift, self.clock)

    def _resize(self, n_rows: int, width: int) -> None:
        old = None if self.cache is None else (self.cache, self.key_mask, self.first_column, self.positions,
                                               self.logits)
        self.cache = KVCache(self.model.config, n_rows, width, self.dtype, self.device)
        self.key_mask = torch.zeros(n_rows, width, dtype=torch.bool, device=self.device)
        self.first_column = torch.zeros(n_rows, dtype=torch.long, device=self.device)
        self.positions = torch.zeros(n_rows, dtype=torch.long, device=self.device)
        self.logits = torch.zeros(n_rows, self.model.config.vocab_size, device=self.device)
        if old is not None:
            cache, key_mask, first_column, positions, logits = old
            n, c = len(key_mask), self.clock
            copy_columns(self.cache, cache, c)
            self.key_mask[:n, :c] = key_mask[:, :c]
            self.first_column[:n], self.positions[:n], self.logits[:n] = first_column, positions, logits


class FixedSlots(Slots):
    """Engine.generate's batch over sequences fixed up front (num_samples per prompt): rows (B,) the output row of
    each slot, finished (B,) (empty slots too). A prompt is prefilled once for all its samples."""

    def __init__(self, model: CausalLM, prompt_ids: list[list[int]], num_samples: int, n_slots: int,
                 max_new_tokens: int, pad_id: int,
                 static_decoder: Callable[[KVCache, torch.Tensor], StaticDecoder | None] = lambda *_: None):
        self.prompt_ids, self.num_samples, self.pad_id = prompt_ids, num_samples, pad_id
        longest_prompt = max(len(p) for p in prompt_ids)
        n_slots = min(n_slots, len(prompt_ids) * num_samples)  # a slot never filled would hold no output row
        # A sequence spans at most longest_prompt + max_new_tokens columns: twice that slides rarely and never grows;
        # the clock never goes below the longest prompt, so a newcomer's prompt always fits before it
        super().__init__(model, n_slots, n_slots, 2 * (longest_prompt + max_new_tokens), floor=longest_prompt)
        self.waiting = deque(range(len(prompt_ids) * num_samples))
        self.prefilled: dict[int, tuple] = {}  # prompt -> (cache, its row, padded length, logits (V,))
        self.rows = torch.zeros(n_slots, dtype=torch.long, device=self.device)
        self.finished = torch.ones(n_slots, dtype=torch.bool, device=self.device)
        self._admit(list(range(n_slots)))
        self.decoder = static_decoder(self.cache, self.key_mask[:, : self.clock])
        if self.decoder is not None:
            self.key_mask = self.decoder.mask[:, 0, 0]  # (B, width), a view: what the decoder attends

    def done(self) -> bool:
        return not self.waiting and bool(self.finished.all())

    def step(self, tokens: torch.Tensor) -> None:
        """Feed each running row its token, then give the finished rows' slots to waiting ones."""
        if not self.waiting:
            tokens, self.decoder = drop_finished(self, tokens, self.cache, self.decoder,
                                                 ("rows", "first_column", "positions", "logits", "key_mask"))
            if self.decoder is not None:
                self.key_mask = self.decoder.mask[:, 0, 0]
        if not bool(self.finished.all()):
            self._make_room(len(tokens), self.first_column[~self.finished])
            self._decode(tokens)
        if self.waiting:
            self._admit(self.finished.nonzero().squeeze(-1).tolist())

    def _admit(self, free: list[int]) -> None:
        """The next waiting sequences take these slots, their prompts prefilled once, in one forward."""
        newcomers = [self.waiting.popleft() for _ in range(min(len(free), len(self.waiting)))]
        new = sorted({row // self.num_samples for row in newcomers} - self.prefilled.keys())
        if new:
            cache, logits, key_mask = prefill(self.model, [self.prompt_ids[i] for i in new], self.pad_id)
            self.prefilled.update({p: (cache, j, key_mask.shape[1], logits[j]) for j, p in enumerate(new)})
        for slot, row in zip(free, newcomers):
            prompt = row // self.num_samples
            cache, j, P, logits = self.prefilled[prompt]
            n = len(self.prompt_ids[prompt])
            self._enter(slot, cache, j, P - n, n, logits, n)
            self.rows[slot], self.finished[slot] = row, False
        # Sequences are admitted in order: only the next one's prompt may still be needed.
        next_prompt = self.waiting[0] // self.num_samples if self.waiting else None
        self.prefilled = {next_prompt: self.prefilled[next_prompt]} if next_prompt in self.prefilled else {}
