"""One worker thread owns the engine and runs the requests waiting at each moment as one batched generate call.

Requests (jobs) queue up; the worker takes as many as fit in `max_batch` rows (a request asking for n completions
takes n rows). It starts once no new request has come for `batch_wait_s` (or after 10 times that in all): a lone
client waits a few milliseconds, while a crowd whose requests trickle in as the previous batch's answers go out is
gathered into one batch instead of being split into a small one and a large one. Requests that arrive during a batch wait for the next one (the engine cannot add rows
to a running batch). Each step, the engine's on_step callback turns every row's new token into events for its
request: text deltas (when the request streams or has stop strings), then one Done. The callback also ends rows
early: those of a request whose client went away (`Job.cancel()`), freeing their place in the batch, and those
that completed a stop string. Events reach the request through its `deliver` function, which must be thread-safe
(the server hands them to its event loop with `call_soon_threadsafe`).
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


@dataclass
class Delta:
    index: int  # which of the request's n completions
    text: str


@dataclass
class Done:
    index: int
    finish_reason: str  # "stop" (end-of-text or a stop string) or "length"
    completion_tokens: int
    text: str  # the whole completion text, cut before a stop string


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

    def push(self, token: int, events: list[Event]) -> bool:
        """Record one token, adding this row's events; True when the row must be ended now (a stop string)."""
        self.ids.append(token)
        if self.text is not None:
            delta = self.text.push(token)
            if delta and self.job.stream:
                events.append(Delta(self.index, delta))
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
                events.append(Delta(self.index, tail))
            text = self.text.text
        else:
            text = self.tokenizer.decode([t for t in self.ids if t not in self.tokenizer.eos_ids])
        events.append(Done(self.index, reason, len(self.ids), text))
        self.done = True


class Batcher:
    """The engine's only user while serving: submit() from any thread, one batch at a time on the worker."""

    def __init__(self, engine: Engine, *, max_batch: int = 64, batch_wait_s: float = 0.005, max_pending: int = 4096):
        self.engine = engine
        self.max_batch, self.batch_wait_s, self.max_pending = max_batch, batch_wait_s, max_pending
        self.stats = {"batches": 0, "rows": 0, "max_batch_rows": 0, "aborted_rows": 0, "stopped_rows": 0,
                      "cancelled_waiting": 0, "failed_batches": 0, "completion_tokens": 0}
        self._pending: collections.deque[Job] = collections.deque()
        self._cond = threading.Condition()
        self._closing = False
        self._thread = threading.Thread(target=self._run, name="r1lab-batcher", daemon=True)
        self._thread.start()

    def submit(self, job: Job) -> None:
        if job.params.n > self.max_batch:
            raise ValueError(f"n={job.params.n} is more than the batch holds ({self.max_batch})")
        with self._cond:
            if self._closing:
                raise Overloaded("the server is shutting down")
            if len(self._pending) >= self.max_pending:
                raise Overloaded(f"{len(self._pending)} requests are already waiting")
            self._pending.append(job)
            self._cond.notify()

    def close(self, timeout: float = 10.0) -> None:
        """Stop taking work, tell waiting requests, and let the running batch finish."""
        with self._cond:
            self._closing = True
            waiting = list(self._pending)
            self._pending.clear()
            self._cond.notify()
        for job in waiting:
            job.deliver([Failed("the server is shutting down")])
        self._thread.join(timeout)

    @property
    def pending(self) -> int:
        return len(self._pending)

    # --- worker thread -----------------------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            jobs = self._collect()
            if jobs is None:
                return
            if jobs:
                self._run_batch(jobs)

    def _collect(self) -> list[Job] | None:
        """Wait for a first job, then for more until none came for batch_wait_s or max_batch rows. None: closing."""
        with self._cond:
            while not self._pending and not self._closing:
                self._cond.wait()
            if self._closing:
                return None
            start = time.monotonic()
            jobs, rows, quiet_until = [], 0, start + self.batch_wait_s
            while True:
                while self._pending and rows + self._pending[0].params.n <= self.max_batch:
                    job = self._pending.popleft()
                    quiet_until = time.monotonic() + self.batch_wait_s  # more may be on the way
                    if job.cancelled:
                        self.stats["cancelled_waiting"] += 1
                        continue
                    jobs.append(job)
                    rows += job.params.n
                left = min(quiet_until, start + MAX_WAIT_FACTOR * self.batch_wait_s) - time.monotonic()
                if self._pending or rows >= self.max_batch or left <= 0 or self._closing:
                    return jobs
                self._cond.wait(left)

    def _run_batch(self, jobs: list[Job]) -> None:
        rows = [_Row(job, j, self.engine) for job in jobs for j in range(job.params.n)]
        self.stats["batches"] += 1
        self.stats["rows"] += len(rows)
        self.stats["max_batch_rows"] = max(self.stats["max_batch_rows"], len(rows))
        try:
            self.engine.generate(
                [r.job.prompt_ids for r in rows], max_new_tokens=[r.job.params.max_tokens for r in rows],
                temperature=[r.job.params.temperature for r in rows], top_p=[r.job.params.top_p for r in rows],
                seed=[_row_seed(r.job.params.seed, r.index) for r in rows], on_step=lambda i, t: self._on_step(rows, i, t))
        except Exception as err:  # one bad batch must not take the server down
            log.exception("generate failed")
            self.stats["failed_batches"] += 1
            for job in {r.job for r in rows if not r.done}:
                job.deliver([Failed(f"generation failed: {type(err).__name__}: {err}")])
            return
        for job in {r.job for r in rows if not r.done and not r.job.cancelled}:  # the engine ended a row we did not see end
            events: list[Event] = []
            for r in rows:
                if r.job is job and not r.done:
                    r.finish("length", events)
            job.deliver(events)

    def _on_step(self, rows: list[_Row], indices: list[int], tokens: list[int]) -> list[int]:
        """The engine's per-step callback: route tokens to requests; return the rows to end now."""
        end, events = [], collections.defaultdict(list)
        for i, token in zip(indices, tokens):
            row = rows[i]
            if row.job.cancelled:
                end.append(i)
                self.stats["aborted_rows"] += 1
                continue
            if row.push(token, events[row.job]):
                end.append(i)
                self.stats["stopped_rows"] += 1
            self.stats["completion_tokens"] += 1
        for job, job_events in events.items():
            if job_events:
                job.deliver(job_events)
        return end


def _row_seed(seed: int | None, index: int) -> int | None:
    """Completion `index` of a seeded request: its own seed, so n > 1 samples differ and none depends on the batch."""
    if seed is None or index == 0:
        return seed
    return (seed * 1_000_003 + index) % (2**62)
