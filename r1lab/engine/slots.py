"""Continuous batching for the engine: a fixed number of slots, each a row of one preallocated KV cache.

A GRPO step's completions vary widely in length. Run all at once (or in batches), a batch lasts as long as its
longest completion and a finished row is either wasted work or, compacted away, a smaller batch for the rest of the
run. Here at most n_slots sequences run at a time; when one finishes, the next waiting sequence takes its slot at
the following step, its prompt prefilled by a forward of its own between two decode steps. The engine
(Engine.generate with max_rows) samples and records; this module owns the cache rows and who holds them.

Every row writes its next key at the same cache column (the clock), so one decode step is one forward over the
slots, as in the engine's other modes. A newcomer's prompt is written to the columns just before the clock and its
key mask hides everything else in the row: the previous occupant's keys stay in the buffer but are never attended.
Columns that no running row attends any more are slid out from time to time, so the attended width stays near
the longest running sequence. Rotary positions are per row and travel with the keys, so a slide changes nothing.

With static decoding (r1lab/engine/static_decode.py, a CUDA graph on a GPU) the slots are the decoder's fixed rows: its mask
is the slots' key mask, newcomers and slides write into the same buffers in place, and the cache is slid only when
full (every step attends the whole buffer anyway).
"""

from __future__ import annotations

from collections import deque
from typing import Callable

import torch

from r1lab.engine.static_decode import StaticDecoder
from r1lab.model.transformer import CausalLM, KVCache

SLIDE_MIN_COLUMNS = 32  # slide dead columns out only once there are this many (a slide copies the whole cache)
SLIDE_SHARE = 4  # ... and they are at least 1 / SLIDE_SHARE of the columns in use


class Slots:
    """The running sequences (output rows, prompt-major) and the waiting ones, over a cache of n_slots rows.

    It is the engine's batch: rows (B,) output row of each slot, finished (B,), logits (B, V), as Engine._record
    and Engine._call_back expect. A finished slot keeps its row until a newcomer takes it, or, once nobody waits,
    until the batch is compacted (the tail of the run then shrinks, as in the engine's dynamic mode).
    """

    def __init__(self, model: CausalLM, prompt_ids: list[list[int]], num_samples: int, n_slots: int,
                 max_new_tokens: int, pad_id: int,
                 static_decoder: Callable[[KVCache, torch.Tensor], StaticDecoder | None] = lambda *_: None):
        """static_decoder(cache, key_mask) gives the engine's fixed-shape decoder over the filled columns, or None
        for the dynamic decode."""
        self.model, self.prompt_ids, self.num_samples, self.pad_id = model, prompt_ids, num_samples, pad_id
        device, dtype = next(model.parameters()).device, next(model.parameters()).dtype
        self.longest_prompt = max(len(p) for p in prompt_ids)
        # One running sequence spans at most longest_prompt + max_new_tokens columns; twice that leaves room to
        # slide rarely.
        self.width = 2 * (self.longest_prompt + max_new_tokens)
        n_slots = min(n_slots, len(prompt_ids) * num_samples)  # a slot never filled would hold no output row
        self.cache = KVCache(model.config, n_slots, self.width, dtype, device)
        self.clock = self.longest_prompt  # the column every row writes next; a newcomer's prompt ends just before
        self.waiting = deque(range(len(prompt_ids) * num_samples))
        self.prefilled: dict[int, tuple[KVCache, int, torch.Tensor]] = {}  # prompt -> (cache, its row, logits (V,))
        self.unadmitted = [num_samples] * len(prompt_ids)  # samples of each prompt still waiting
        self.rows = torch.zeros(n_slots, dtype=torch.long, device=device)
        self.key_mask = torch.zeros(n_slots, self.width, dtype=torch.bool, device=device)  # real keys of each row
        self.first_column = torch.zeros(n_slots, dtype=torch.long, device=device)  # where each row's prompt starts
        self.positions = torch.zeros(n_slots, dtype=torch.long, device=device)  # position id of the next token
        self.logits = torch.zeros(n_slots, model.config.vocab_size, device=device)
        self.finished = torch.ones(n_slots, dtype=torch.bool, device=device)  # empty slots count as finished
        self._admit(list(range(n_slots)))
        self.decoder = static_decoder(self.cache, self.key_mask[:, : self.clock])
        if self.decoder is not None:
            self.key_mask = self.decoder.mask[:, 0, 0]  # (B, width), a view: what the decoder attends

    def done(self) -> bool:
        return not self.waiting and bool(self.finished.all())

    def step(self, tokens: torch.Tensor) -> None:
        """Feed each running row its sampled token (B,), then give the slots of finished rows to waiting ones."""
        if not self.waiting:
            tokens = self._compact(tokens)
        if not bool(self.finished.all()):
            self._slide_if_worth_it()
            self.logits = self._decode(tokens)  # (B, V)
            self.clock += 1
            self.positions = self.positions + 1
        if self.waiting:
            self._admit(self.finished.nonzero().squeeze(-1).tolist())

    def _decode(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.decoder is not None:
            return self.decoder.step(tokens, self.positions)  # writes at the clock and unmasks that column itself
        self.key_mask[:, self.clock] = True
        return self.model.forward_cached(tokens[:, None], self.positions[:, None], self.cache, self.clock,
                                         self.key_mask[:, : self.clock + 1])

    def _admit(self, free: list[int]) -> None:
        """The next waiting sequences take these slots, their prompts prefilled (once per prompt)."""
        newcomers = [self.waiting.popleft() for _ in range(min(len(free), len(self.waiting)))]
        self._prefill({row // self.num_samples for row in newcomers} - self.prefilled.keys())
        for slot, row in zip(free, newcomers):
            prompt = row // self.num_samples
            source, source_row, logits = self.prefilled[prompt]
            n = len(self.prompt_ids[prompt])
            start = self.clock - n
            self.cache.copy_row(slot, start, source, source_row, source.layers[0][0].shape[2] - n, n)
            self.key_mask[slot] = False
            self.key_mask[slot, start : self.clock] = True
            self.first_column[slot], self.positions[slot], self.logits[slot] = start, n, logits
            self.rows[slot], self.finished[slot] = row, False
            self.unadmitted[prompt] -= 1
            if self.unadmitted[prompt] == 0:  # its last sample is in: the prefilled copy is no longer needed
                del self.prefilled[prompt]

    def _prefill(self, prompts: set[int]) -> None:
        """One forward over these prompts, left-padded; each keeps its cache row and last logits until its
        samples have all taken a slot."""
        if not prompts:
            return
        order = sorted(prompts)
        ids = [self.prompt_ids[i] for i in order]
        P = max(len(p) for p in ids)
        device, dtype = self.rows.device, self.cache.layers[0][0].dtype
        padded = torch.tensor([[self.pad_id] * (P - len(p)) + list(p) for p in ids], device=device)  # (n, P)
        key_mask = torch.tensor([[False] * (P - len(p)) + [True] * len(p) for p in ids], device=device)
        positions = (key_mask.long().cumsum(-1) - 1).clamp(min=0)
        cache = KVCache(self.model.config, len(ids), P, dtype, device)
        logits = self.model.forward_cached(padded, positions, cache, 0, key_mask)  # (n, V)
        for j, prompt in enumerate(order):
            self.prefilled[prompt] = (cache, j, logits[j])

    def _slide_if_worth_it(self) -> None:
        """Slide out the columns before every running row's prompt, when they are many or the cache is full. The
        clock never goes below the longest prompt, so a newcomer's prompt always fits before it."""
        running = ~self.finished
        oldest = int(self.first_column[running].min()) if bool(running.any()) else self.clock
        shift = min(oldest, self.clock - self.longest_prompt)
        full = self.clock + 1 > self.width
        if not full and (self.decoder is not None or shift < SLIDE_MIN_COLUMNS or shift * SLIDE_SHARE < self.clock):
            return
        self.cache.slide(shift, self.clock)
        self.key_mask[:, : self.clock - shift] = self.key_mask[:, shift : self.clock].clone()
        self.key_mask[:, self.clock - shift :] = False
        self.first_column = (self.first_column - shift).clamp(min=0)  # finished rows' columns no longer matter
        self.clock -= shift
        if self.decoder is not None:
            self.decoder.move_to(self.clock)

    def _compact(self, tokens: torch.Tensor) -> torch.Tensor:
        """Nobody waits: once a quarter of the rows are finished (half with static decoding, whose smaller batch is
        captured anew), drop them, so they stop costing compute."""
        n_done = int(self.finished.sum())
        if n_done == 0 or n_done * (4 if self.decoder is None else 2) < len(self.finished):
            return tokens
        keep = (~self.finished).nonzero().squeeze(-1)
        for name in ("rows", "first_column", "positions", "logits", "finished"):
            setattr(self, name, getattr(self, name)[keep])
        if self.decoder is not None:
            self.decoder = self.decoder.select(keep)  # selects the cache's rows too
            self.key_mask = self.decoder.mask[:, 0, 0]
        else:
            self.cache.select(keep)
            self.key_mask = self.key_mask[keep]
        return tokens[keep]
