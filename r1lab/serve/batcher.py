"""One worker thread owns the engine and runs the completions waiting at each moment as one batched generate call.

Each request prompt (a job) asking for n completions queues n rows under its client (the server names clients by
their remote address). A batch starts once no new request has come for `batch_wait_s` (or after 10 times that in
all): a lone client waits a few milliseconds, while a crowd whose requests trickle in as the previous batch's answers
go out is gathered into one batch instead of being split into a small one and a large one. The batch takes up to
`max_batch` waiting rows round-robin across clients, one row per client in turn, so a client that queued a thousand
rows cannot push a later client's one row behind them.

The engine cannot add rows to a running batch, so a client arriving mid-batch would wait for the whole batch. When
a waiting client holds fewer rows than its share (max_batch / active clients) while another holds more, the running
batch pauses inside its per-step callback and runs the waiting clients' rows (up to their shares, requests of at
most `yield_max_tokens` tokens) as a nested batch to their end, then resumes where it stopped: its cache is kept, so
nothing is recomputed and every row's tokens are those it would have had (a cut-and-continue scheme would pay a
prefill per cut: on a CPU about as much as generating the tokens again). Between two such pauses the running batch
advances at least `yield_every` steps, so a stream of small requests slows a flood but cannot stop it; nested
batches do not nest further. The cost is memory: a paused batch's cache stays while the nested one runs.

Each step, the engine's on_step callback turns every row's new token into events for its request: text deltas
(when the request streams or has stop strings), then one Done. The callback also ends rows early: those of a
request whose client went away (`Job.cancel()`), freeing their place in the batch, and those that completed a stop
string. Events reach the request through its `deliver` function, which must be thread-safe (the server hands them
to its event loop with `call_soon_threadsafe`).
"""
from __future__ import annotations

import collections
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from r1lab.engine import Engine
from r1lab.serve.textstream import TextStream

log = logging.getLogger("r1lab.serve")
MAX_WAIT_FACTOR = 10  # a batch starts at most this many batch_wait_s after its first request


@dataclass
class SamplingParams:
    max_tokens: int
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    logprobs: bool = False  # the events carry each token's sampling log-prob


TokenLogprob = tuple[int, float]  # a completion token and its log-prob under the sampling distribution


@dataclass
class Delta:
    index: int  # which of the request's n completions
    text: str
    logprobs: list[TokenLogprob] | None = None  # the tokens pushed since the last Delta (text may lag behind them)


@dataclass
class Done:
    index: int
    finish_reason: str  # "stop" (end-of-text or a stop string) or "length"
    completion_tokens: int
    text: str  # the whole completion text, cut before a stop string
    logprobs: list[TokenLogprob] | None = None  # every completion token, end-of-text and stop string included


@dataclass
class Failed:
    message: str


Event = Delta | Done | Failed


@dataclass(eq=False)
class Job:
    prompt_ids: list[int]
    params: SamplingParams
    deliver: Callable[[list[Event]], None]  # called from the worker thread
    stream: bool = False  # send Delta events as text is produced (else only Done)
    client: str = ""  # who asked: rows are shared fairly between clients
    cancelled: bool = False
    submitted_at: float = field(default_factory=time.monotonic)

    def cancel(self) -> None:
        """The client went away: its rows end at the next step, or it never starts."""
        self.cancelled = True


class Overloaded(RuntimeError):
    pass


class _Row:
    """One completion being generated: token count, text, and whether its Done was sent."""

    def __init__(self, job: Job, index: int, engine: Engine):
        self.job, self.index = job, index
        self.tokenizer = engine.tokenizer
        self.ids: list[int] = []
        self.text = TextStream(engine.tokenizer, job.params.stop) if (job.stream or job.params.stop) else None
        self.done = False
        self.logprobs: list[TokenLogprob] | None = [] if job.params.logprobs else None
        self.logprobs_sent = 0  # how many went out in Deltas

    def push(self, token: int, events: list[Event], logprob: float | None = None) -> bool:
        """Record one token, adding this row's events; True when the row must be ended now (a stop string)."""
        self.ids.append(token)
        if self.logprobs is not None:
            self.logprobs.append((token, logprob))
        if self.text is not None:
            delta = self.text.push(token)
            if delta and self.job.stream:
                events.append(self._delta(delta))
            if self.text.stopped:
                self.finish("stop", events)
                return True
        if token in self.tokenizer.eos_ids:
            self.finish("stop", events)
        elif len(self.ids) >= self.job.params.max_tokens:
            self.finish("length", events)
        return False

    def finish(self, reason: str, events: list[Event]) -> None:
        if self.text is not None:
            tail = self.text.flush()
            if tail and self.job.stream:
                events.append(self._delta(tail))
            text = self.text.text
        else:
            text = self.tokenizer.decode([t for t in self.ids if t not in self.tokenizer.eos_ids])
        logprobs = list(self.logprobs) if self.logprobs is not None else None
        events.append(Done(self.index, reason, len(self.ids), text, logprobs))
        self.done = True

    def _delta(self, text: str) -> Delta:
        """A text delta carrying the log-probs of the tokens pushed since the previous one."""
        if self.logprobs is None:
            return Delta(self.index, text)
        new, self.logprobs_sent = self.logprobs[self.logprobs_sent:], len(self.logprobs)
        return Delta(self.index, text, new)


@dataclass
class _Running:
    """A batch being generated: its rows, whether it runs nested inside a paused one, steps since its last pause."""

    rows: list[_Row]
    nested: bool
    steps: int = 0


class Batcher:
    """The engine's only user while serving: submit() from any thread, one batch at a time on the worker."""

    def __init__(self, engine: Engine, *, max_batch: int = 64, batch_wait_s: float = 0.005, max_pending: int = 4096,
                 yield_every: int = 32, yield_max_tokens: int = 512):
        self.engine = engine
        self.max_batch, self.batch_wait_s, self.max_pending = max_batch, batch_wait_s, max_pending
        self.yield_every, self.yield_max_tokens = yield_every, yield_max_tokens
        self.stats = {"batches": 0, "rows": 0, "max_batch_rows": 0, "aborted_rows": 0, "stopped_rows": 0,
                      "cancelled_waiting": 0, "failed_batches": 0, "completion_tokens": 0, "nested_batches": 0,
                      "nested_rows": 0}
        self._queues: dict[str, collections.deque[_Row]] = {}  # waiting rows per client; order = whose turn is next
        self._waiting = 0  # rows in the queues
        self._arrivals = 0  # submits so far: the collector sees whether more came while it waited
        self._cond = threading.Condition()
        self._closing = False
        self._thread = threading.Thread(target=self._run, name="r1lab-batcher", daemon=True)
        self._thread.start()

    def submit(self, job: Job) -> None:
        if job.params.n > self.max_batch:
            raise ValueError(f"n={job.params.n} is more than the batch holds ({self.max_batch})")
        rows = [_Row(job, j, self.engine) for j in range(job.params.n)]
        with self._cond:
            if self._closing:
                raise Overloaded("the server is shutting down")
            if self._waiting >= self.max_pending:
                raise Overloaded(f"{self._waiting} completions are already waiting")
            self._queues.setdefault(job.client, collections.deque()).extend(rows)
            self._waiting += len(rows)
            self._arrivals += 1
            self._cond.notify()

    def close(self, timeout: float = 10.0) -> None:
        """Stop taking work, tell waiting requests, and let the running batch finish."""
        with self._cond:
            self._closing = True
            waiting = {r.job: None for q in self._queues.values() for r in q}
            self._queues.clear()
            self._waiting = 0
            self._cond.notify()
        for job in waiting:
            job.deliver([Failed("the server is shutting down")])
        self._thread.join(timeout)

    @property
    def pending(self) -> int:
        """Completions waiting for a batch."""
        return self._waiting

    # --- worker thread -----------------------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            rows = self._collect()
            if rows is None:
                return
            if rows:
                self._run_batch(_Running(rows, nested=False))

    def _collect(self) -> list[_Row] | None:
        """Wait for a first row, then for more until none came for batch_wait_s or max_batch rows wait; take a
        batch round-robin across clients. None: closing."""
        with self._cond:
            while not self._queues and not self._closing:
                self._cond.wait()
            if self._closing:
                return None
            start = time.monotonic()
            quiet_until, seen = start + self.batch_wait_s, self._arrivals
            while self._waiting < self.max_batch and not self._closing:
                left = min(quiet_until, start + MAX_WAIT_FACTOR * self.batch_wait_s) - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
                if self._arrivals != seen:  # more may be on the way
                    quiet_until, seen = time.monotonic() + self.batch_wait_s, self._arrivals
            return self._take({c: self.max_batch for c in self._queues})

    def _take(self, quota: dict[str, int], fits=lambda row: True) -> list[_Row]:
        """Up to max_batch waiting rows, one per client in turn, at most quota[client] each, from the front of each
        client's queue while `fits` holds; a client served goes to the back of the line, so the next batch starts
        with the next client. Called holding the lock."""
        rows: list[_Row] = []
        line = collections.deque(c for c in self._queues if quota.get(c, 0) > 0)
        while line and len(rows) < self.max_batch:
            client = line.popleft()
            queue = self._queues[client]
            if not fits(queue[0]):
                continue
            row = queue.popleft()
            self._waiting -= 1
            if row.job.cancelled:
                self.stats["cancelled_waiting"] += 1
            else:
                rows.append(row)
                quota[client] -= 1
            self._queues[client] = self._queues.pop(client)  # to the back of the line
            if not queue:
                del self._queues[client]
            elif quota[client] > 0:
                line.append(client)
        return rows

    def _run_batch(self, batch: _Running) -> None:
        rows = batch.rows
        self.stats["batches"] += 1
        self.stats["rows"] += len(rows)
        self.stats["max_batch_rows"] = max(self.stats["max_batch_rows"], len(rows))
        # Per-step log-probs cost a host copy per step: asked of the engine only when a row wants them.
        with_logprobs = {"step_logprobs": True} if any(r.job.params.logprobs for r in rows) else {}
        try:
            self.engine.generate(
                [r.job.prompt_ids for r in rows], max_new_tokens=[r.job.params.max_tokens for r in rows],
                temperature=[r.job.params.temperature for r in rows], top_p=[r.job.params.top_p for r in rows],
                seed=[_row_seed(r.job.params.seed, r.index) for r in rows],
                on_step=lambda i, t, lp=None: self._on_step(batch, i, t, lp), **with_logprobs)
        except Exception as err:  # one bad batch must not take the server down
            log.exception("generate failed")
            self.stats["failed_batches"] += 1
            for job in {r.job: None for r in rows if not r.done}:
                job.deliver([Failed(f"generation failed: {type(err).__name__}: {err}")])
            return
        # the engine ended a row we did not see end
        for job in {r.job: None for r in rows if not r.done and not r.job.cancelled}:
            events: list[Event] = []
            for r in rows:
                if r.job is job and not r.done:
                    r.finish("length", events)
            job.deliver(events)

    def _on_step(self, batch: _Running, indices: list[int], tokens: list[int],
                 logprobs: list[float] | None = None) -> list[int]:
        """The engine's per-step callback: route tokens (and log-probs, when asked for) to requests, maybe pause for
        waiting clients; return the rows to end now."""
        end, events = [], collections.defaultdict(list)
        for k, (i, token) in enumerate(zip(indices, tokens)):
            row = batch.rows[i]
            if row.job.cancelled:
                end.append(i)
                self.stats["aborted_rows"] += 1
                continue
            if row.push(token, events[row.job], logprobs[k] if logprobs is not None else None):
                end.append(i)
                self.stats["stopped_rows"] += 1
            self.stats["completion_tokens"] += 1
        for job, job_events in events.items():
            if job_events:
                job.deliver(job_events)
        batch.steps += 1
        if not batch.nested and batch.steps >= self.yield_every and self._queues:
            guests = self._take_guests(batch.rows)
            if guests:  # this batch waits, its cache intact, while the guests run to their end
                self.stats["nested_batches"] += 1
                self.stats["nested_rows"] += len(guests)
                self._run_batch(_Running(guests, nested=True))
                batch.steps = 0
        return end

    def _take_guests(self, running: list[_Row]) -> list[_Row]:
        """The rows of waiting clients that hold fewer than their share of the running batch, up to their shares,
        when some client holds more: none otherwise (a crowd of one-row clients just waits for the next batch)."""
        held = collections.Counter(r.job.client for r in running if not r.done and not r.job.cancelled)
        with self._cond:
            share = max(1, self.max_batch // len(set(held) | set(self._queues)))
            if not any(n > share for n in held.values()):
                return []
            quota = {c: share - held[c] for c in self._queues if held[c] < share}
            return self._take(quota, fits=lambda row: row.job.params.max_tokens <= self.yield_max_tokens)


def _row_seed(seed: int | None, index: int) -> int | None:
    """Completion `index` of a seeded request: its own seed, so n > 1 samples differ and none depends on the batch."""
    if seed is None or index == 0:
        return seed
    return (seed * 1_000_003 + index) % (2**62)
