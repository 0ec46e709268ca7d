"""One worker thread owns the engine and runs every request in one continuous batch (r1lab/engine/live_batch.py).

A request prompt (a job) for n completions queues n rows under its client (its remote address). The worker gives free
slots to waiting rows, steps, and turns each row's token into events for its job's thread-safe `deliver`: text deltas
(when it streams or has stop strings), then one Done. Slots go round-robin to clients (docs/serving.md); a client under
its share that finds none free gets the parked slots (LiveBatch.park) of the client holding the most; light and heavy
clients' rows run in two lanes, the light one taking LIGHT_SHARE of the steps. With tools, a row leaves the batch at
its tool block's close tag while the code runs on a thread pool, and comes back with the output appended.
"""
from __future__ import annotations

import collections
import logging
import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

from r1lab.engine.engine import Engine
from r1lab.engine.live_batch import LiveBatch, Sequence, StepToken
from r1lab.engine.tools import (Runner, ToolSpec, block_code, call_tool, cut_at_close, output_tokens, run_in_sandbox,
                                turn_seed)
from r1lab.rewards.sandbox.runner import ProgramResult
from r1lab.serve.textstream import TextStream

log = logging.getLogger("r1lab.serve")
MAX_WAIT_FACTOR = 10  # an idle worker starts at most this many batch_wait_s after a first request
# the light lane's share of the engine's time while heavier clients run: a light request then takes ~1.5x its idle time
LIGHT_SHARE = 2 / 3
LIGHT, HEAVY = 0, 1  # the two lanes: LiveBatches of light clients' rows and of heavy ones'


@dataclass
class SamplingParams:
    max_tokens: int
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: every token
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
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
    finish_reason: str  # "stop" (end-of-text, a stop string, a tool call past the limit) or "length"
    completion_tokens: int  # tool outputs' tokens included: they fill max_tokens like the model's
    text: str  # the whole completion text, cut before a stop string
    logprobs: list[TokenLogprob] | None = None  # every completion token; a tool output's carry 0.0 (not sampled)


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
        self.seq: int | None = None  # its id in the LiveBatch once started (a parked row keeps it)
        self.parked: Sequence | None = None  # taken out of its batch, waiting in its client's queue
        self.calls = 0  # tool blocks closed: also the turn its next sequence is (each call starts one)
        self.turn_start = 0  # where in ids the current turn's tokens start
        self.calling = False  # its tool call runs: out of every batch and queue until it is back

    def sequence_args(self, stops: tuple[str, ...]) -> dict:
        """LiveBatch.add's arguments for the row's current turn: prompt and completion so far, and the turn's seed."""
        p = self.job.params
        seed = _row_seed(p.seed, self.index) if self.calls == 0 else turn_seed(p.seed, self.index, self.calls)
        return dict(prompt_ids=self.job.prompt_ids + self.ids, max_new_tokens=p.max_tokens - len(self.ids),
                    temperature=p.temperature, top_p=p.top_p, top_k=p.top_k, min_p=p.min_p,
                    repetition_penalty=p.repetition_penalty, presence_penalty=p.presence_penalty,
                    frequency_penalty=p.frequency_penalty, seed=seed, stop_strings=stops,
                    output_start=len(self.job.prompt_ids))  # penalties count the whole completion, tool outputs too

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


class Batcher:
    """The engine's only user while serving: submit() from any thread, continuous batches on the worker."""

    def __init__(self, engine: Engine, *, max_batch: int = 64, batch_wait_s: float = 0.005, max_pending: int = 4096,
                 tools: ToolSpec | None = None, runner: Runner = run_in_sandbox):
        self.engine = engine
        self.max_batch, self.batch_wait_s, self.max_pending = max_batch, batch_wait_s, max_pending
        self.tools, self.runner = tools, runner
        self._stops = (tools.close,) if tools else ()  # a row's sequence stops where it closes a tool block
        # each call is a process of its own: the threads only wait for them
        self._pool = ThreadPoolExecutor(max(1, min(max_batch, 2 * (os.cpu_count() or 1))), "r1lab-tool") \
            if tools else None
        self._calling: set[_Row] = set()  # rows whose tool call runs
        self._back: list[tuple[_Row, ProgramResult | None]] = []  # calls done, for the worker to append
        # served by /health: batches are busy spells (the worker starting from idle), rows are completions started
        self.stats = {"batches": 0, "rows": 0, "max_batch_rows": 0, "aborted_rows": 0, "stopped_rows": 0,
                      "cancelled_waiting": 0, "failed_batches": 0, "completion_tokens": 0, "steps": 0,
                      "parked_rows": 0, "moved_rows": 0, "light_steps": 0, "tool_calls": 0, "tool_limit_rows": 0,
                      "drafted": 0, "accepted": 0}
        self._lanes = [LiveBatch(engine, max_batch), LiveBatch(engine, max_batch)]  # LIGHT, HEAVY
        self._lane_time = [0.0, 0.0]  # seconds each lane stepped since light and heavy clients both run
        self._running: dict[int, _Row] = {}  # by LiveBatch id; the worker's alone
        self._lane: dict[int, int] = {}  # the lane of each running row
        self._queues: dict[str, collections.deque[_Row]] = {}  # waiting rows per client; order = whose turn is next
        self._waiting = 0  # rows in the queues
        self._arrivals = 0  # submits so far: the idle worker sees whether more came while it waited
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
        """Stop taking work, tell waiting requests, and let the running rows finish."""
        with self._cond:
            self._closing = True
            rows = [r for q in self._queues.values() for r in q] + list(self._calling) + [r for r, _ in self._back]
            waiting = dict.fromkeys(r.job for r in rows)
            self._queues.clear()
            self._calling.clear()
            self._back.clear()
            self._waiting = 0
            self._cond.notify()
        for job in waiting:
            job.deliver([Failed("the server is shutting down")])
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
        self._thread.join(timeout)

    @property
    def pending(self) -> int:
        """Completions waiting for a slot (parked ones included)."""
        return self._waiting

    def _run(self) -> None:
        while True:
            if not self._running:
                if not self._gather():
                    return
                self.stats["batches"] += 1
            self._admit()
            if self._running:
                self._step()

    def _gather(self) -> bool:
        """Nothing runs: wait for a first row (or a call back), then for more until none came for batch_wait_s or
        max_batch rows wait. False: closing."""
        with self._cond:
            while not self._queues and not self._back and not self._closing:
                self._cond.wait()
            if self._closing:
                return False
            start = time.monotonic()
            quiet_until, seen = start + self.batch_wait_s, self._arrivals
            while self._waiting < self.max_batch and not self._closing:
                left = min(quiet_until, start + MAX_WAIT_FACTOR * self.batch_wait_s) - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
                if self._arrivals != seen:  # more may be on the way
                    quiet_until, seen = time.monotonic() + self.batch_wait_s, self._arrivals
            return True

    def _admit(self) -> None:
        """Free slots to waiting rows, fairly, after parking rows for the waiting clients under their share."""
        self._take_back_calls()
        with self._cond:
            if not self._queues:
                return
            held = collections.Counter(r.job.client for r in self._running.values())
            share = max(1, self.max_batch // len(set(held) | set(self._queues)))
            self._park_for_waiting(held, share)
            rows = self._take(self.max_batch - len(self._running), held, share)
        lane_of = {r.job.client: self._lane[seq] for seq, r in self._running.items()}
        for row in rows:
            lane = lane_of.get(row.job.client, LIGHT)  # beside the client's other rows; _sort_lanes may move it
            if row.parked is None:
                row.seq = self._lanes[lane].add(**row.sequence_args(self._stops))
                self.stats["rows"] += row.calls == 0  # a row back from a tool call is the same completion
            else:
                self._lanes[lane].put(row.parked)
                row.parked = None
            self._running[row.seq] = row
            self._lane[row.seq] = lane
        self.stats["max_batch_rows"] = max(self.stats["max_batch_rows"], len(self._running))

    def _park_for_waiting(self, held: collections.Counter, share: int) -> None:
        """Park the running rows that waiting clients under their share lack free slots for, each of the client
        holding the most (over its share). Called holding the lock."""
        owed = sum(min(len(q), share - held[c]) for c, q in self._queues.items() if held[c] < share)
        for _ in range(owed - (self.max_batch - len(self._running))):
            client, n = max(held.items(), key=lambda item: item[1], default=("", 0))
            if n <= share:
                return
            row = max((r for r in self._running.values() if r.job.client == client), key=lambda r: r.seq)
            row.parked = self._lanes[self._lane.pop(row.seq)].take(row.seq)
            del self._running[row.seq]
            held[client] -= 1
            self._queues.setdefault(client, collections.deque()).appendleft(row)  # next of this client's rows
            self._waiting += 1
            self.stats["parked_rows"] += 1

    def _take(self, free: int, held: collections.Counter, share: int) -> list[_Row]:
        """Up to `free` waiting rows, one per client in turn: first only clients under their share, then any; a
        client served goes to the back of the line. Called holding the lock."""
        rows: list[_Row] = []
        for capped in (True, False):
            line = collections.deque(self._queues)
            while line and len(rows) < free:
                client = line.popleft()
                if capped and held[client] >= share:
                    continue
                queue = self._queues[client]
                row = queue.popleft()
                self._waiting -= 1
                if row.job.cancelled:  # a parked row's keys go with it
                    self.stats["cancelled_waiting" if row.parked is None else "aborted_rows"] += 1
                    row.parked = None
                else:
                    rows.append(row)
                    held[client] += 1
                self._queues[client] = self._queues.pop(client)  # to the back of the line
                if not queue:
                    del self._queues[client]
                else:
                    line.append(client)
        return rows

    def _step(self) -> None:
        """One decode step of the lanes whose turn it is; route the tokens to their requests."""
        light = self._light_clients()
        if light is not None:
            self._sort_lanes(light)
        lanes = self._lanes_to_step(light is not None)
        tokens: list[StepToken] = []
        for lane in lanes:
            start = time.perf_counter()
            try:
                tokens += self._lanes[lane].step()
            except Exception as err:  # one bad step must not take the server down
                self._fail_running(err)
                return
            self._lane_time[lane] += time.perf_counter() - start
        self.stats["steps"] += 1
        self.stats["light_steps"] += lanes == [LIGHT]
        self.stats.update(self.engine.speculative_counts)
        events: dict[Job, list[Event]] = collections.defaultdict(list)
        for t in tokens:
            self._route(t, events)
        for job, job_events in events.items():
            if job_events:
                job.deliver(job_events)

    def _light_clients(self) -> set[str] | None:
        """The clients holding at most the mean number of rows, or None when nobody holds more than the rest."""
        held = collections.Counter(r.job.client for r in self._running.values())
        light = {c for c, n in held.items() if n * len(held) <= len(self._running)}
        if len(light) == len(held):
            self._lane_time = [0.0, 0.0]  # nothing owed to anyone
            return None
        return light

    def _sort_lanes(self, light: set[str]) -> None:
        """Every running row to its client's lane (taken out of one batch and put into the other, keys and all)."""
        for seq, row in self._running.items():
            want = LIGHT if row.job.client in light else HEAVY
            if self._lane[seq] != want:
                self._lanes[want].put(self._lanes[self._lane[seq]].take(seq))
                self._lane[seq] = want
                self.stats["moved_rows"] += 1

    def _lanes_to_step(self, split: bool) -> list[int]:
        """Both busy lanes, unless light and heavy clients both run: then one lane per step, the light one taking
        LIGHT_SHARE of the time."""
        busy = [lane for lane in (LIGHT, HEAVY) if not self._lanes[lane].idle]
        if not split or len(busy) < 2:
            return busy
        light_time, heavy_time = self._lane_time
        return [LIGHT] if light_time * (1 - LIGHT_SHARE) <= heavy_time * LIGHT_SHARE else [HEAVY]

    def _route(self, t: StepToken, events: dict[Job, list[Event]]) -> None:
        """A row's token to its request's events; a row whose client left, or that completed a stop string, ends."""
        row = self._running.get(t.seq)
        if row is None:  # it ended at the step's token before (a speculative step gives a row two)
            return
        lane = self._lanes[self._lane[t.seq]]
        if row.job.cancelled:
            lane.cancel(t.seq)
            del self._running[t.seq], self._lane[t.seq]
            self.stats["aborted_rows"] += 1
            return
        self.stats["completion_tokens"] += 1
        if row.push(t.token, events[row.job], t.logprob):
            self.stats["stopped_rows"] += 1
        elif t.finish_reason is not None and not row.done:  # the engine ended a row we did not see end
            if self._closed_block(t):
                self._call(row, events[row.job])
            else:
                row.finish(t.finish_reason, events[row.job])
        if row.done or row.calling:
            if t.finish_reason is None:
                lane.cancel(t.seq)
            del self._running[t.seq], self._lane[t.seq]

    def _closed_block(self, t: StepToken) -> bool:
        """Whether a sequence's "stop" was its tool block's close tag (its only stop string) rather than end-of-text."""
        return self.tools is not None and t.finish_reason == "stop" and t.token not in self.engine.tokenizer.eos_ids

    def _call(self, row: _Row, events: list[Event]) -> None:
        """The row closed a tool block: past max_tool_calls it ends; else it leaves the batch while its code runs."""
        row.calls += 1
        if row.calls > self.tools.max_calls:
            self.stats["tool_limit_rows"] += 1
            row.finish("stop", events)
            return
        turn = cut_at_close(self.engine.tokenizer.decode(row.ids[row.turn_start:]), self.tools)
        code = block_code(turn, self.tools)
        with self._cond:
            if self._closing:
                events.append(Failed("the server is shutting down"))
                row.done = True
                return
            row.calling = True
            self._calling.add(row)
            self.stats["tool_calls"] += 1
            future = self._pool.submit(call_tool, code, self.tools, self.runner)
        future.add_done_callback(lambda f: self._call_done(row, f))

    def _call_done(self, row: _Row, future: Future) -> None:
        """A pool thread: hand the result to the worker (woken if it idles) unless the server closed meanwhile."""
        if future.cancelled():
            return
        with self._cond:
            if row not in self._calling:  # closing: its request was told
                return
            self._calling.discard(row)
            self._back.append((row, future.result()))
            self._cond.notify()

    def _take_back_calls(self) -> None:
        """Append the calls' outputs to their rows, and queue the rows that go on at the front of their clients'."""
        with self._cond:
            back, self._back = self._back, []
        for row, result in back:
            row.calling = False
            if row.job.cancelled:
                self.stats["aborted_rows"] += 1
                continue
            events: list[Event] = []
            ids, _ = output_tokens(result, self.tools, self.engine.tokenizer, row.job.params.max_tokens - len(row.ids))
            for token in ids:  # 0.0: a tool output's tokens were not sampled
                self.stats["completion_tokens"] += 1
                if row.push(token, events, 0.0):  # a stop string inside the output
                    self.stats["stopped_rows"] += 1
                if row.done:  # that, or max_tokens reached
                    break
            if not row.done:
                row.turn_start = len(row.ids)
                with self._cond:
                    self._queues.setdefault(row.job.client, collections.deque()).appendleft(row)
                    self._waiting += 1
            if events:
                row.job.deliver(events)

    def _fail_running(self, err: Exception) -> None:
        log.exception("generation failed")
        self.stats["failed_batches"] += 1
        for job in {r.job: None for r in self._running.values()}:
            job.cancel()  # its rows still queued (parked in the batch dropped below) are dropped, not resumed
            job.deliver([Failed(f"generation failed: {type(err).__name__}: {err}")])
        self._running.clear()
        self._lane.clear()
        self._lanes = [LiveBatch(self.engine, self.max_batch), LiveBatch(self.engine, self.max_batch)]


def _row_seed(seed: int | None, index: int) -> int | None:
    """Completion `index` of a seeded request: its own seed, so n > 1 samples differ and none depends on the batch."""
    if seed is None or index == 0:
        return seed
    return (seed * 1_000_003 + index) % (2**62)
