"""Users' reward functions, added to the built-in ones: `r1lab grpo --reward-functions '{"my_rewards:brevity": 0.5}'`.

A "module:function" or "path/to/file.py:function" is called as `function(completion, problem)`, or, written for TRL's
GRPOTrainer, `function(completions, **kwargs)` over a batch of one; it returns a real number within +-MAX_REWARD,
logged as `reward/<function name>`. The functions run in worker processes (RewardWorkers) so that nothing they do can
end or hang training: a failure gives 0 and counts in scorer_errors or scorer_timeouts.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib
import importlib.util
import inspect
import math
import numbers
import os
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass
from functools import lru_cache, partial
from multiprocessing import Pipe
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Callable, TypeVar

RewardFunction = Callable[[str, object], float]
T = TypeVar("T")

# Rewards are summed in float32 and normalised per group: up to 1e6, float32 still tells r and r + 1 apart and a
# group's variance cannot overflow. No sensible reward needs more: it is a bug to report, not a value to train on.
MAX_REWARD = 1e6
LOAD_TIMEOUT_S = 120.0  # importing the function's module in a fresh worker (it may import heavy libraries)
NO_LIMIT_S = 60.0  # what a call gets when reward_timeout_s <= 0: workers are never allowed to hang the run
GRACE_S = 1.0  # past the timeout, for the worker's own interruption to arrive before the worker is killed
FLUSH_S = 0.05  # a worker sends its outcomes at least this often, and before any call that runs longer

Outcome = tuple  # ("ok", float) | ("error", reason) | ("timeout", None)


@lru_cache(maxsize=None)
def load_reward_function(spec: str) -> RewardFunction:
    """The function a "module:function" or "file.py:function" spec names; ValueError saying what is wrong."""
    source, sep, name = str(spec).rpartition(":")
    if not sep or not source or not name.isidentifier():
        raise ValueError(f"reward function {spec!r}: write it as 'module:function' or 'path/to/file.py:function'")
    fn = getattr(_load_module(spec, source), name, None)
    if not callable(fn):
        raise ValueError(f"reward function {spec!r}: {source} has no function {name!r}")
    try:
        signature = inspect.signature(fn)
        if "completions" in signature.parameters:  # TRL's `fn(completions, **kwargs)`, open-r1's among them
            return partial(_call_trl_style, fn)
        signature.bind("completion", None)
    except TypeError:
        raise ValueError(f"reward function {spec!r}: it must accept (completion, problem), or be written for TRL as "
                         "(completions, **kwargs)") from None
    except ValueError:  # builtins without a signature: let the call decide
        pass
    return fn


def _call_trl_style(fn: Callable, completion: str, problem) -> float:
    """fn over a batch of one, with what TRL passes: prompts, completions (as messages for a conversational prompt)
    and the row's other columns. None (the function does not apply) is 0, as TRL's nansum makes it."""
    conversational = problem.messages is not None
    columns = {"solution": problem.meta.get("solution"), **problem.meta.get("columns", {})}
    values = fn(prompts=[problem.messages if conversational else problem.prompt],
                completions=[[{"role": "assistant", "content": completion}] if conversational else completion],
                **{name: [value] for name, value in columns.items()})
    if not isinstance(values, (list, tuple)) or len(values) != 1:
        raise RewardValueError(f"returned {type(values).__name__}, not a list of one reward per completion (TRL's "
                               "reward functions return a list)")
    return 0.0 if values[0] is None else values[0]


def callable_spec(fn: Callable) -> str:
    """The "module:function" (or "script.py:function") spec by which the reward workers import fn."""
    if not callable(fn):
        raise ValueError(f"reward function {fn!r}: not callable")
    name, module = getattr(fn, "__qualname__", ""), getattr(fn, "__module__", None)
    if not name.isidentifier() or module is None:
        raise ValueError(f"reward function {name or fn!r}: r1lab's reward workers import a function by name, so it "
                         "must be defined with def at the top level of a module or script (not a lambda, a nested "
                         "function or a method)")
    if module == "__main__":
        script = getattr(sys.modules["__main__"], "__file__", None)
        if not script or not script.endswith(".py"):
            raise ValueError(f"reward function {name!r}: defined in an interactive session, which the reward workers "
                             "cannot import: put it in a .py file and import it from there")
        return f"{Path(script).resolve()}:{name}"
    return f"{module}:{name}"


def _load_module(spec: str, source: str):
    """The module a spec names, a file.py or an importable module; ValueError if loading it fails (sys.exit too)."""
    path, is_file = Path(source), source.endswith(".py")
    if is_file and not path.is_file():
        raise ValueError(f"reward function {spec!r}: no file {path}")
    try:
        if not is_file:
            return importlib.import_module(source)
        module_spec = importlib.util.spec_from_file_location(f"r1lab_reward_{path.stem}", path)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
        return module
    except (Exception, SystemExit) as err:
        failed = f"{path} failed to load" if is_file else f"cannot import {source!r}"
        raise ValueError(f"reward function {spec!r}: {failed} ({type(err).__name__}: {err})") from None


def component_name(spec: str) -> str:
    """The metric name of a function's reward: its function name, e.g. reward/brevity."""
    return str(spec).rpartition(":")[2]


class RewardValueError(ValueError):
    """A reward function returned something that is not a usable reward."""


def checked_reward(value: object) -> float:
    """value as a float if it is a finite real number within +-MAX_REWARD, else RewardValueError. A str or bool
    is refused: a bug, or a predicate returned where a score was meant."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise RewardValueError(f"returned {type(value).__name__}, not a number (int or float)")
    try:
        number = float(value)
    except (OverflowError, ValueError, TypeError) as err:  # e.g. an int beyond the float range
        raise RewardValueError(f"returned a number that is not a float ({err})") from None
    if not math.isfinite(number):
        raise RewardValueError(f"returned {number}, not a finite number")
    if abs(number) > MAX_REWARD:
        raise RewardValueError(f"returned {number:g}, beyond the bound of +-{MAX_REWARD:g}")
    return number


class _ScorerTimeout(BaseException):
    """Raised by the SIGALRM handler; a BaseException so that scorers' `except Exception` cannot swallow it."""


def _on_alarm(signum: int, frame: object) -> None:
    raise _ScorerTimeout()


def call_with_timeout(fn: Callable[[], T], timeout_s: float) -> T:
    """fn(), interrupted by _ScorerTimeout after timeout_s seconds (main thread only; elsewhere no limit). Signal
    handlers run between bytecodes: a single long C call is only interrupted when it returns."""
    if timeout_s is None or timeout_s <= 0 or threading.current_thread() is not threading.main_thread():
        return fn()
    old_handler = signal.signal(signal.SIGALRM, _on_alarm)
    old_delay, old_interval = signal.setitimer(signal.ITIMER_REAL, timeout_s)
    started = time.monotonic()
    try:
        try:
            return fn()
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
    finally:
        # The outer finally still runs if the alarm fires inside the inner one, so the handler is always restored.
        signal.signal(signal.SIGALRM, old_handler)
        if old_delay > 0:  # give an enclosing timer back what is left of its time
            remaining = max(old_delay - (time.monotonic() - started), 1e-3)
            signal.setitimer(signal.ITIMER_REAL, remaining, old_interval)


def _worker_main(fd: int) -> None:
    """A worker's loop: a job is (spec, cwd, sys.path, timeout_s, one_by_one, [(completion, problem), ...]); it
    answers ("loaded", error or None), then ("done", [outcome, ...]) batches in order."""
    # Ctrl-C and SIGTERM (which a scheduler sends to every process of the job) are the trainer's to handle; it then
    # closes the workers
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.SIG_IGN)
    _die_with_parent()
    conn = Connection(fd)
    reporter = _Reporter(conn)
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            return  # the trainer closed the pipe or is gone
        except BaseException as err:  # a job that cannot be unpickled here (e.g. a Problem class not importable)
            reporter.send(("loaded", f"its job could not be read in the worker ({_describe(err)})"))
            continue
        spec, cwd, path, timeout_s, one_by_one, items = message
        fn, error = _load_in_worker(spec, cwd, path)
        reporter.send(("loaded", error))
        for i, (completion, problem) in enumerate(items if fn is not None else ()):
            reporter.begin()
            reporter.add(_call(fn, completion, problem, timeout_s), last=one_by_one or i == len(items) - 1)


class _Reporter:
    """Sends a worker's outcomes in batches, but a watchdog thread flushes them once a call has run for FLUSH_S:
    when the trainer kills a worker for a call that overran, the first unanswered item is that call."""

    def __init__(self, conn: Connection) -> None:
        self.conn, self.lock = conn, threading.Lock()
        self.pending: list[Outcome] = []
        self.started: float | None = None  # when the running call began; None between calls
        self.flushed = time.monotonic()
        threading.Thread(target=self._watch, daemon=True).start()

    def send(self, message: tuple) -> None:
        with self.lock:
            self.conn.send(message)

    def begin(self) -> None:
        with self.lock:
            self.started = time.monotonic()

    def add(self, outcome: Outcome, last: bool) -> None:
        with self.lock:
            self.started = None
            self.pending.append(outcome)
            if last or time.monotonic() - self.flushed > FLUSH_S:
                self._flush()

    def _watch(self) -> None:
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})  # the alarm is for the thread running the calls
        while True:
            time.sleep(FLUSH_S)
            with self.lock:
                if self.pending and self.started is not None and time.monotonic() - self.started > FLUSH_S:
                    self._flush()

    def _flush(self) -> None:
        self.conn.send(("done", self.pending))
        self.pending, self.flushed = [], time.monotonic()


def _die_with_parent() -> None:
    """Ask Linux to kill this worker when the trainer dies, even a worker stuck in a user's endless loop."""
    with contextlib.suppress(OSError, AttributeError):  # not Linux: the closed pipe still ends an idle worker
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG


def _load_in_worker(spec: str, cwd: str, path: list[str]) -> tuple[RewardFunction | None, str | None]:
    try:
        if os.getcwd() != cwd:
            os.chdir(cwd)  # relative "file.py:function" specs mean what they meant to the trainer
        sys.path[:] = path + [entry for entry in sys.path if entry not in path]  # the trainer's first, r1lab's kept
        return load_reward_function(spec), None
    except BaseException as err:
        return None, str(err) if isinstance(err, ValueError) else _describe(err)


def _call(fn: RewardFunction, completion: str, problem: object, timeout_s: float) -> Outcome:
    try:
        # The check runs under the alarm too: converting a strange number type runs user code.
        return "ok", call_with_timeout(lambda: checked_reward(fn(completion, problem)), timeout_s)
    except _ScorerTimeout:
        return "timeout", None
    except RewardValueError as err:
        return "error", str(err)
    except BaseException as err:  # SystemExit, KeyboardInterrupt, GeneratorExit...: all contained
        return "error", _describe(err)


def _describe(err: BaseException) -> str:
    try:
        text = str(err)
    except BaseException:  # an exception whose __str__ raises
        text = "?"
    return f"raised {type(err).__name__}" + (f": {text[:200]}" if text else "")


class _Worker:
    """One worker process: a fresh interpreter (no fork of a trainer holding CUDA and threads) importing only this
    module."""

    def __init__(self) -> None:
        parent, child = Pipe()
        root = str(Path(__file__).resolve().parents[2])
        code = "import sys; sys.path.insert(0, sys.argv[1]); from r1lab.rewards.user_functions import _worker_main; " \
               "_worker_main(int(sys.argv[2]))"
        self.process = subprocess.Popen([sys.executable, "-c", code, root, str(child.fileno())],
                                        pass_fds=[child.fileno()], stdin=subprocess.DEVNULL)
        child.close()
        self.conn = parent

    def kill(self) -> None:
        self.conn.close()
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()


@dataclass
class _Job:
    spec: str
    slots: list[int]  # where each item's outcome goes in the caller's list
    items: list[tuple[str, object]]  # (completion, problem)
    # The worker answers each call as it ends. Set after a worker died: outcomes it had not yet sent were lost
    # with it, so which call killed it is only known when every call is answered before the next begins.
    one_by_one: bool = False


@dataclass
class _Running:
    worker: _Worker
    job: _Job
    done: int = 0  # items answered
    loading: bool = True
    deadline: float = 0.0


class RewardWorkers:
    """Worker processes for users' reward functions, kept between calls; a job is a chunk of completions in one
    message, so that a cheap function costs about what it would in-process."""

    def __init__(self, workers: int | None = None) -> None:
        # R1LAB_REWARD_WORKERS, else up to 4: scoring runs between generation and the update, when cores are free
        configured = os.environ.get("R1LAB_REWARD_WORKERS", "").strip()
        default = max(1, int(configured)) if configured.isdigit() else max(1, min(4, os.cpu_count() or 1))
        self.size = workers or default
        self._idle: list[_Worker] = []
        self._lock = threading.Lock()
        self._pid = os.getpid()  # a forked copy of the trainer must not close the trainer's workers

    def __enter__(self) -> "RewardWorkers":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def score(self, batches: dict[str, list[tuple[str, object]]], timeout_s: float) -> dict[str, list[Outcome]]:
        """For each spec, the outcome of spec(completion, problem) for each item: ("ok", reward),
        ("error", reason) or ("timeout", None). Never raises for anything a reward function does."""
        limit = timeout_s if timeout_s and timeout_s > 0 else NO_LIMIT_S
        out = {spec: [("error", "not scored")] * len(items) for spec, items in batches.items()}
        queue = deque(job for spec, items in batches.items() for job in _split(spec, items, self.size))
        running: dict[Connection, _Running] = {}
        with self._lock:
            try:
                while queue or running:
                    while queue and len(running) < self.size:
                        self._start(queue.popleft(), limit, running, out)
                    if running:  # else every job left failed to be sent
                        self._advance(running, queue, out, limit)
            except BaseException:
                for state in running.values():  # their late answers would be read as the next job's
                    state.worker.kill()
                raise
        return out

    def _start(self, job: _Job, limit: float, running: dict, out: dict) -> None:
        message = (job.spec, os.getcwd(), list(sys.path), limit, job.one_by_one, job.items)
        worker = self._idle.pop() if self._idle else _Worker()
        try:
            try:
                worker.conn.send(message)
            except OSError:  # the idle worker died since its last job: one fresh try
                worker.kill()
                worker = _Worker()
                worker.conn.send(message)
        except Exception as err:  # e.g. a Problem whose meta cannot be pickled; pickling fails before writing
            self._idle.append(worker)
            for slot in job.slots:
                out[job.spec][slot] = ("error", f"its arguments cannot be sent to a worker ({err})")
            return
        running[worker.conn] = _Running(worker, job, deadline=time.monotonic() + LOAD_TIMEOUT_S)

    def _advance(self, running: dict, queue: deque, out: dict, limit: float) -> None:
        """Read what the workers answered, or act on the first deadline that passes."""
        soonest = min(state.deadline for state in running.values())
        for conn in wait(list(running), timeout=max(0.0, soonest - time.monotonic())):
            while conn in running and conn.poll():
                try:
                    message = conn.recv()
                except (EOFError, OSError):
                    code = running[conn].worker.process.wait()
                    self._fail(running, conn, queue, out, ("error", f"ended its worker process (exit code {code})"))
                    break
                self._receive(running, conn, message, out, limit)
        now = time.monotonic()
        for conn, state in list(running.items()):
            if state.deadline <= now and not conn.poll():
                self._fail(running, conn, queue, out, ("timeout", None))

    def _receive(self, running: dict, conn: Connection, message: Outcome, out: dict, limit: float) -> None:
        state = running[conn]
        job, (kind, value) = state.job, message
        if state.loading:
            state.loading = False
            if value is not None:  # the function cannot be loaded there: every item is an error
                self._finish(running, conn, out, ("error", f"cannot be loaded in a worker: {value}"))
                return
        else:
            for outcome in value:
                out[job.spec][job.slots[state.done]] = outcome
                state.done += 1
        state.deadline = time.monotonic() + limit + GRACE_S
        if state.done == len(job.items):
            self._finish(running, conn, out, None)

    def _finish(self, running: dict, conn: Connection, out: dict, rest: Outcome | None) -> None:
        state = running.pop(conn)
        for slot in state.job.slots[state.done:] if rest else ():
            out[state.job.spec][slot] = rest
        self._idle.append(state.worker)

    def _fail(self, running: dict, conn: Connection, queue: deque, out: dict, outcome: Outcome) -> None:
        """The worker died or overran: it is killed, its call gets outcome, and the rest of its job is queued again.
        A batched worker that died may not have sent every outcome: its unanswered calls are retried one by one."""
        state = running.pop(conn)
        state.worker.kill()
        job, done = state.job, state.done
        if state.loading:
            reason = "its worker died while loading it" if outcome[0] == "error" else \
                f"loading it in a worker took more than {LOAD_TIMEOUT_S:.0f} s"
            for slot in job.slots:
                out[job.spec][slot] = ("error", reason)
            return
        if outcome[0] == "error" and not job.one_by_one:
            queue.appendleft(_Job(job.spec, job.slots[done:], job.items[done:], one_by_one=True))
            return
        out[job.spec][job.slots[done]] = outcome
        if done + 1 < len(job.items):
            queue.appendleft(_Job(job.spec, job.slots[done + 1:], job.items[done + 1:], job.one_by_one))

    def close(self) -> None:
        """End every worker: closing its pipe ends an idle one; any still running after a moment is killed."""
        if os.getpid() != self._pid:
            return
        with self._lock:
            workers, self._idle = self._idle, []
        for worker in workers:
            worker.conn.close()
        deadline = time.monotonic() + 1.0
        for worker in workers:
            try:
                worker.process.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                worker.process.kill()
                worker.process.wait()


def _split(spec: str, items: list, parts: int) -> list[_Job]:
    """items in at most `parts` contiguous chunks of near-equal size, one message each."""
    n = len(items)
    parts = max(1, min(parts, n))
    bounds = [n * k // parts for k in range(parts + 1)]
    return [_Job(spec, list(range(a, b)), items[a:b]) for a, b in zip(bounds, bounds[1:]) if b > a]


@lru_cache(maxsize=None)
def reward_workers() -> RewardWorkers:
    """The process's shared pool, created on first use and closed at exit."""
    pool = RewardWorkers()
    atexit.register(pool.close)
    return pool
