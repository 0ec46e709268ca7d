"""A continuous batch that sequences join and leave between decode steps: the engine under `r1lab serve`.

Engine.generate(max_rows=N) runs a set of sequences fixed when it is called. A server's requests arrive while others
run, so here a sequence is added at any time (add) and takes a row at the next step, its prompt prefilled by a forward
of its own; step() samples one token for every running sequence and feeds them forward together. Each sequence keeps
its own sampling settings (vLLM's min-p and penalties included), token limit, stop strings and random generator, so
a seeded sequence samples the same tokens whoever runs beside it (its logits differ only by float rounding).

The layout is Slots' (r1lab/engine/slots.py). The running sequences are kept packed in the first rows (a row freed
takes the last row's contents), so a step's forward covers only the rows in use; the buffers start small and double
(rows or columns) when they must.

A sequence can be taken out of a batch (take): running, its row's keys are copied aside and the row freed. Put back,
into the same batch or another (put), it takes a row again and goes on exactly where it stopped (rotary positions
travel with the keys, its generator is its own). A server parks a client's rows this way to give a client that just
arrived its share of the rows at once, and moves a heavy client's rows to a batch of their own so that they do not
slow a light client's steps (r1lab/serve/batcher.py).
Not thread-safe: one thread owns a LiveBatch.
"""

from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass, field

import torch

from r1lab.engine.engine import Engine
from r1lab.engine.sampling import NO_PENALTIES, Penalties, row_generator, sample_next
from r1lab.engine.slots import Slots, prefill
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
    logits: torch.Tensor  # (V,) the next token's, not sampled yet
    position: int


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
    def span(self) -> int:
        """Columns it needs before the clock when it takes a row."""
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
        """Queue a sequence; it starts at the next step (when a slot is free). With a seed and no min-p or penalties
        its tokens are those of Engine.generate([prompt_ids], seed=[seed], ...) with the same settings. The penalties
        (r1lab/engine/sampling.py Penalties) count the output from prompt_ids[output_start:] on (default: the sampled
        tokens only). Returns its id."""
        if not prompt_ids or max_new_tokens < 1:
            raise ValueError("a sequence needs at least one prompt token and max_new_tokens >= 1")
        seq = Sequence(next(_sequence_ids), list(prompt_ids), max_new_tokens, temperature, top_p, top_k,
                       tuple(stop_strings), row_generator(seed, 0, self.device), min_p,
                       (repetition_penalty, presence_penalty, frequency_penalty),
                       len(prompt_ids) if output_start is None else output_start)
        self.sequences[seq.id] = seq
        self.waiting.append(seq)
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
        """Remove a sequence to put() it back later, here or into another LiveBatch of the same engine: running, its
        row's keys are set aside and the row freed; it then goes on where it stopped, with the same tokens."""
        seq = self.sequences.pop(seq_id)
        if seq in self.waiting:
            self.waiting.remove(seq)
            return seq
        r = self.rows.index(seq)
        start = int(self.first_column[r])
        cache = KVCache(self.model.config, 1, self.clock - start, self.dtype, self.device)
        cache.copy_row(0, 0, self.cache, r, start, self.clock - start)
        seq.parked = _Parked(cache, self.key_mask[r, start : self.clock].clone(), self.logits[r].clone(),
                             int(self.positions[r]))
        self._free_row(r)
        return seq

    def put(self, seq: Sequence) -> None:
        """A sequence taken from this batch or another waits for a row (it has one at the next step, if free)."""
        self.sequences[seq.id] = seq
        self.waiting.append(seq)

    @torch.inference_mode()
    def step(self) -> list[StepToken]:
        """Give free rows to waiting sequences, sample one token for every running sequence and feed the tokens
        forward. Returns each running sequence's token; those that ended leave the batch."""
        self._admit()
        B = len(self.rows)
        if B == 0:
            return []
        params = self._row_params()
        tokens, logprobs = sample_next(self.logits[:B], *params)  # (B,), (B,)
        penalties = params[-1]
        if penalties is not None:
            penalties.record(tokens)
        out = [StepToken(seq.id, token, logprob, self._finish_reason(seq, token))
               for seq, token, logprob in zip(self.rows, tokens.tolist(), logprobs.tolist())]
        self._make_room(B, self.first_column[:B], self.clock)  # the clock before a slide: a full cache also grows
        self._decode(tokens)  # rows that just ended are fed too: cheaper than a compaction before the forward
        for r in reversed(range(B)):  # from the end, so the row moved into a freed one has been looked at
            if out[r].finish_reason is not None:
                del self.sequences[out[r].seq]
                self._free_row(r)
        return out

    # --- inside ----------------------------------------------------------------------------------------------------

    def _finish_reason(self, seq: Sequence, token: int) -> str | None:
        seq.generated.append(token)
        if token in self.engine.tokenizer.eos_ids:
            return "stop"
        if seq.stop_strings and self.engine.hits_stop(seq.generated, seq.stop_strings):
            return "stop"
        return "length" if len(seq.generated) >= seq.max_new_tokens else None

    def _row_params(self) -> tuple:
        """sample_next's (temperature, top_k, top_p, generators, min_p, penalties): (B, 1) tensors, the rows'
        generators and their Penalties (None when no row has any), rebuilt when the rows change; between changes
        step() records each sampled token in the penalties' statistics."""
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
        """The running rows' penalties and the tokens they read (listed only for rows that have penalties)."""
        if all(s.penalties == NO_PENALTIES for s in self.rows):
            return None
        counted = [s if s.penalties != NO_PENALTIES else None for s in self.rows]
        return Penalties.build([s.penalties for s in self.rows],
                               [s.prompt + s.generated if s else [] for s in counted],
                               [s.prompt[s.output_start:] + s.generated if s else [] for s in counted],
                               self.logits.shape[1], self.device)

    def _admit(self) -> None:
        """The waiting sequences take the free rows: new prompts prefilled together, parked rows copied back."""
        n = min(self.n_slots - len(self.rows), len(self.waiting))
        if n <= 0:
            return
        newcomers = [self.waiting.popleft() for _ in range(n)]
        span = max(s.span for s in newcomers)
        self._make_room(len(self.rows), self.first_column[: len(self.rows)], span, new_rows=n)
        self.clock = max(self.clock, span)  # running rows see a masked gap: harmless
        fresh = [s for s in newcomers if s.parked is None]
        if fresh:
            cache, logits, key_mask = prefill(self.model, [s.prompt for s in fresh], self.engine.tokenizer.pad_id)
        for seq in newcomers:
            if seq.parked is None:
                j = fresh.index(seq)
                self._enter(len(self.rows), cache, j, key_mask.shape[1] - seq.span, seq.span, logits[j], seq.span)
            else:
                p, seq.parked = seq.parked, None
                self._enter(len(self.rows), p.cache, 0, 0, len(p.key_mask), p.logits, p.position, p.key_mask)
            self.rows.append(seq)
        self._params = None

    def _free_row(self, r: int) -> None:
        """Row r leaves the batch; the last row's sequence moves into it, so the running rows stay packed."""
        last = len(self.rows) - 1
        if r != last:
            start = int(self.first_column[last])
            self.cache.copy_row(r, start, self.cache, last, start, self.clock - start)
            for t in (self.key_mask, self.first_column, self.positions, self.logits):
                t[r] = t[last]
            self.rows[r] = self.rows[last]
        self.rows.pop()
        self._params = None
