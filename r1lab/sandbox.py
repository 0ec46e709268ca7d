"""Run untrusted Python (a candidate solution and its assert tests) in a separate, locked-down process.

The code reward (R1 recipe section 3: "code: run against test cases in a sandbox") executes model output, so the
code is treated as hostile. What contains it, from the outside in:

- its own process in a new session, killed as a whole process group in a `finally`, whatever happens here;
- a wall-clock timeout (here) and a CPU-time limit (in the child), address-space, file-size and open-file limits,
  and no core dumps;
- a fresh temporary working directory, removed afterwards;
- when this process is root (containers): a private network namespace, and uid nobody with RLIMIT_NPROC = 0, so
  forks, signals to this process and writes to the host fail at the OS level;
- in any case, a Python audit hook installed before the candidate runs (r1lab/_sandbox_child.py) that refuses
  process creation, signals, sockets, ctypes, frame/gc introspection and writes outside the temporary directory.
  It is what contains a root child when the OS layers are not permitted.

Results come back as nonce-tagged lines on a private pipe, so printing, closing stdout or faking a report earns
nothing. The candidate and each test are run afresh per test, so one failure does not hide the others.

Limits of the design: an audit hook is an in-process guard, not a security boundary (CPython's documentation says
as much); the OS layers bound what an escape from it can reach. For adversarial workloads, run the trainer in a
container or VM as well. The candidate can read host files that root can read.

    from r1lab.sandbox import run_tests
    run_tests("def f(x): return x + 1", ["assert f(1) == 2", "assert f(2) == 4"])  # SandboxResult(passed=1, ...)
"""

from __future__ import annotations

import contextlib
import marshal
import math
import os
import secrets
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

from r1lab._sandbox_child import NOBODY

CHILD_SCRIPT = Path(__file__).with_name("_sandbox_child.py")
TEMP_PREFIX = "r1lab-sandbox-"
MAX_OUTPUT_BYTES = 1 << 20  # a report is a line per test; more than this is the candidate flooding the pipe
_REAP_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class SandboxResult:
    passed: int  # tests that ran to the end without an exception
    total: int
    error: str | None = None  # why the first failing test failed, or why nothing ran
    timed_out: bool = False
    layers: tuple[str, ...] = ()  # OS isolation that took effect in the child: "netns", "uid"

    @property
    def fraction(self) -> float:
        return self.passed / self.total if self.total else 0.0


def run_tests(
    code: str,
    tests: Sequence[str],
    *,
    timeout_s: float = 2.0,
    memory_mb: int = 256,
    cpu_s: int | None = None,
    file_mb: int = 8,
    open_files: int = 64,
    network_namespace: bool = True,
    drop_privileges: bool = True,
) -> SandboxResult:
    """Run code, then each test (an assert statement) on a fresh run of it, in the sandbox; never raises for
    anything the code does. cpu_s (a backstop: the wall-clock timeout_s normally ends the run first) defaults to
    timeout_s rounded up, plus one."""
    tests = [str(t) for t in tests]
    if not tests:
        return SandboxResult(0, 0, error="no tests")
    if not isinstance(code, str):
        return SandboxResult(0, len(tests), error="code is not a string")
    nonce = secrets.token_hex(16)
    payload = marshal.dumps({
        "code": code, "tests": tests, "nonce": nonce, "cpu_s": int(cpu_s or math.ceil(timeout_s) + 1),
        "memory_mb": int(memory_mb), "file_mb": int(file_mb), "open_files": int(open_files),
        "network_namespace": bool(network_namespace), "drop_privileges": bool(drop_privileges),
    })
    owner = NOBODY if drop_privileges and os.geteuid() == 0 else None
    output, timed_out, returncode = _execute(payload, timeout_s, owner)
    return _parse_report(output, nonce, len(tests), timed_out, returncode)


# ---------------------------------------------------------------- the child process


def _execute(payload: bytes, timeout_s: float, owner: int | None) -> tuple[bytes, bool, int | None]:
    """(report bytes, timed out, exit status) of one child. The process group and the directory are gone on
    return, even when an alarm (rewards.call_with_timeout) fires meanwhile: it is held back until cleanup is
    done, and kills the child at once so that it is not held back for long."""
    with _held_alarm() as on_alarm:
        workdir = tempfile.mkdtemp(prefix=TEMP_PREFIX)
        proc = None
        try:
            if owner is not None:  # the child drops to this uid and must still write in its directory
                os.chown(workdir, owner, owner)
            proc = _spawn(workdir)
            on_alarm.append(lambda: _kill_group(proc))
            output, timed_out = _exchange(proc, payload, timeout_s)
        finally:
            _cleanup(proc, workdir)
        return output, timed_out, proc.returncode


def _spawn(workdir: str) -> subprocess.Popen:
    # -I: no environment variables, no user site, no script directory on sys.path; -S: no site-packages;
    # -B: no .pyc writes. A minimal environment, so nothing of ours leaks to the candidate.
    env = {"PATH": "/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir, "LC_ALL": "C.UTF-8"}
    return subprocess.Popen(
        [sys.executable, "-I", "-S", "-B", str(CHILD_SCRIPT)], cwd=workdir, env=env,
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
        start_new_session=True, close_fds=True,
    )


def _exchange(proc: subprocess.Popen, payload: bytes, timeout_s: float) -> tuple[bytes, bool]:
    """Write the payload, read the report until EOF, MAX_OUTPUT_BYTES or the deadline; (output, timed out)."""
    deadline = time.monotonic() + timeout_s
    pending = memoryview(payload)
    chunks: list[bytes] = []
    size = 0
    assert proc.stdin is not None and proc.stdout is not None
    os.set_blocking(proc.stdin.fileno(), False)
    with selectors.DefaultSelector() as selector:
        selector.register(proc.stdin, selectors.EVENT_WRITE)
        selector.register(proc.stdout, selectors.EVENT_READ)
        while proc.stdout in {key.fileobj for key in selector.get_map().values()}:
            left = deadline - time.monotonic()
            if left <= 0:
                return b"".join(chunks), True
            for key, _ in selector.select(left):
                if key.fileobj is proc.stdin:
                    pending = _write_some(proc.stdin.fileno(), pending)
                    if not pending:
                        selector.unregister(proc.stdin)
                        proc.stdin.close()  # EOF tells the child the payload is complete
                    continue
                data = os.read(proc.stdout.fileno(), 1 << 16)
                if not data:
                    selector.unregister(proc.stdout)
                    continue
                chunks.append(data)
                size += len(data)
                if size > MAX_OUTPUT_BYTES:
                    return b"".join(chunks), False
    return b"".join(chunks), False


def _write_some(fd: int, pending: memoryview) -> memoryview:
    try:
        return pending[os.write(fd, pending):]
    except BlockingIOError:
        return pending
    except (BrokenPipeError, ConnectionResetError):  # the child stopped reading: nothing more to send
        return pending[len(pending):]


def _kill_group(proc: subprocess.Popen | None) -> None:
    """SIGKILL the child's whole process group. The child is not reaped yet, so its pid (= the group id, as it
    leads its own session) cannot have been reused."""
    if proc is None or proc.returncode is not None:
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


def _cleanup(proc: subprocess.Popen | None, workdir: str) -> None:
    if proc is not None:
        _kill_group(proc)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=_REAP_TIMEOUT_S)  # a SIGKILLed process exits at once; the bound is for safety
        for pipe in (proc.stdin, proc.stdout):
            if pipe is not None:
                with contextlib.suppress(OSError):
                    pipe.close()
    shutil.rmtree(workdir, ignore_errors=True)


@contextlib.contextmanager
def _held_alarm() -> Iterator[list[Callable[[], None]]]:
    """Hold back SIGALRM in the block: yields a list of callbacks run at once when it fires; the previous
    handler then runs when the block exits. Only the main thread can set handlers, and only it runs them."""
    if threading.current_thread() is not threading.main_thread():
        yield []
        return
    callbacks: list[Callable[[], None]] = []
    fired: list[object] = []

    def on_alarm(signum: int, frame: object) -> None:
        fired.append(frame)
        for callback in callbacks:
            callback()

    previous = signal.signal(signal.SIGALRM, on_alarm)
    try:
        yield callbacks
    finally:
        signal.signal(signal.SIGALRM, previous)
        if fired:
            _deliver(previous, fired[0])


def _deliver(handler: object, frame: object) -> None:
    """Run a SIGALRM handler that was held back, as the signal would have."""
    if callable(handler):
        handler(signal.SIGALRM, frame)
    elif handler == signal.SIG_DFL:
        signal.raise_signal(signal.SIGALRM)


# ---------------------------------------------------------------- the report


def _parse_report(output: bytes, nonce: str, total: int, timed_out: bool, returncode: int | None) -> SandboxResult:
    """Count the nonce-tagged "ok" lines; anything else on the pipe is ignored."""
    passed: set[int] = set()
    failures: dict[int, str] = {}
    layers: tuple[str, ...] = ()
    done = False
    for line in output.decode("utf-8", "replace").splitlines():
        tag, _, rest = line.partition(" ")
        if tag != nonce:
            continue
        word, _, detail = rest.partition(" ")
        if word == "done":
            done = True
        elif word == "layers":
            layers = tuple(x for x in detail.split(",") if x and x != "-")
        elif word.isdigit() and int(word) < total:
            status, _, reason = detail.partition(" ")
            if status == "ok":
                passed.add(int(word))
            else:
                failures.setdefault(int(word), reason)
    error = failures[min(failures)] if failures else None
    if returncode == -signal.SIGXCPU:
        timed_out, error = True, "CPU time limit exceeded"
    elif timed_out:
        error = "timed out"
    elif not done:
        error = f"the sandboxed process ended early (exit status {returncode})"
    return SandboxResult(len(passed), total, error, timed_out, layers)
