"""Run untrusted Python (model-written code) in an OS sandbox: assert tests judged here, or a program's output.

The code reward (R1 recipe section 3: "code: run against test cases in a sandbox") and the tool calls of a rollout
execute model output, so it is treated as hostile; docs/rewards-and-sandbox.md says how it is contained. Each test is
split here (r1lab.rewards.sandbox.judge) into literal calls and a verdict that never leaves this process; child.py
makes the calls inside the boundary and sends back plain return values, judged here. The boundary is "bwrap"
(bubblewrap) or "landlock" (unshare's namespaces, no capabilities, Landlock rules); where neither works nothing runs,
unless the user opted out with "none". In every mode: its own process group (killed whole), wall-clock and resource
limits, no forks (RLIMIT_NPROC = 0), and child.py's audit hook. SandboxResult.layers names what took effect.

run_program_pooled gets run_program's result from a fork server (per thread and configuration of limits) that
starts like the one-shot child and forks a child per call, confined in the one-shot child's order before the code
runs: nothing a call does (globals, files, a hang, os._exit) reaches the next; a server that fails is replaced.

    run_tests("def f(x): return x + 1", ["assert f(1) == 2", "assert f(2) == 4"])  # SandboxResult(passed=1, ...)
    run_program("print(6 * 7)")  # ProgramResult(output='42\n', ok=True, ...)
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import importlib.util
import marshal
import math
import os
import select
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

from r1lab.rewards.sandbox.child import SERVER_FLAG, STALE_FILES_STATUS
from r1lab.rewards.sandbox.judge import SplitTest, UnjudgeableTestError, parse_values, split_test

CHILD_SCRIPT = Path(__file__).with_name("child.py")
TEMP_PREFIX = "r1lab-sandbox-"
MAX_OUTPUT_BYTES = 1 << 22  # a report is a line of values per test; more than this is the candidate flooding
SANDBOXES = ("auto", "bwrap", "landlock", "none")  # the choices of --sandbox (r1lab/config/groups.py lists them too)
BOUNDARIES = ("bwrap", "landlock")  # the OS boundaries, in the order "auto" tries them
_MODE_LAYERS = {"bwrap": ("bwrap", "netns", "pidns"), "landlock": ("userns", "netns", "pidns"), "none": ()}
_REAP_TIMEOUT_S = 5.0
_PROBE_TIMEOUT_S = 10.0
_SANDBOX_DIR = "/sandbox"  # the working directory inside bubblewrap
_SYSTEM_DIRS = ("/usr", "/lib", "/lib64", "/lib32", "/bin", "/sbin")
_LOADER_CACHE = "/etc/ld.so.cache"  # how the loader finds shared libraries; the rest of /etc stays out
_DEVICES = ("/dev/null", "/dev/zero", "/dev/urandom", "/dev/random")
_ENV = {"PATH": "/usr/bin:/bin", "LC_ALL": "C.UTF-8"}
_LAYERS_LINE_BYTES = 4096  # room for a tool call's first line, the layers the child wrote before the program ran
_default_sandbox = "auto"


@dataclass(frozen=True)
class SandboxResult:
    passed: int  # tests whose verdict held on the returned values
    total: int
    error: str | None = None  # why the first failing test failed, or why nothing ran
    timed_out: bool = False
    layers: tuple[str, ...] = ()  # isolation that took effect: "bwrap", "netns", "pidns", "landlock", ..., "audit"

    @property
    def fraction(self) -> float:
        return self.passed / self.total if self.total else 0.0


def run_tests(code: str, tests: Sequence[str], *, entry_point: str | None = None, timeout_s: float = 2.0,
              memory_mb: int = 256, cpu_s: int | None = None, file_mb: int = 8, open_files: int = 64,
              sandbox: str | None = None) -> SandboxResult:
    """Run code in the sandbox, afresh for each test (one assert, see r1lab.rewards.sandbox.judge), make the test's
    calls there and judge the returned values here; never raises for anything the code does. With an entry_point,
    tests may call it as `candidate`; a test the judge cannot split fails alone. cpu_s (a backstop) defaults to
    timeout_s rounded up, plus one. sandbox: one of SANDBOXES, None for use_sandbox's choice."""
    tests = [str(t) for t in tests]
    if not tests:
        return SandboxResult(0, 0, error="no tests")
    if not isinstance(code, str):
        return SandboxResult(0, len(tests), error="code is not a string")
    mode = resolve_sandbox(sandbox)
    if mode is None:
        return SandboxResult(0, len(tests), error=sandbox_refusal(sandbox))
    splits = [_split_or_reason(t, entry_point) for t in tests]
    calls = [list(s.calls) if isinstance(s, SplitTest) else [] for s in splits]
    limits = _Limits.of(mode, timeout_s, cpu_s, memory_mb, file_mb, open_files)
    payload = marshal.dumps({"code": code, "tests": calls, **limits.child_config()})
    output, timed_out, returncode = _execute(payload, timeout_s, mode, limits.file_mb)
    return _judge_report(output, splits, timed_out, returncode, mode)


@dataclass(frozen=True)
class ProgramResult:
    output: str  # stdout and stderr as the program wrote them (an exception's last line included)
    ok: bool  # it ran to its end without an exception, within its limits
    timed_out: bool = False
    truncated: bool = False  # it printed more than max_output_bytes: cut there, the program killed
    error: str | None = None  # why it is not ok, in a few words
    layers: tuple[str, ...] = ()


def run_program(code: str, *, timeout_s: float = 2.0, memory_mb: int = 256, max_output_bytes: int = 1 << 16,
                cpu_s: int | None = None, file_mb: int = 8, open_files: int = 64,
                sandbox: str | None = None) -> ProgramResult:
    """Run a program once in the sandbox (a tool call, r1lab/engine/tools.py) and return what it printed; the same
    isolation and limits as run_tests. Never raises for anything the code does."""
    limits = _program_limits(code, sandbox, timeout_s, cpu_s, memory_mb, file_mb, open_files)
    if isinstance(limits, ProgramResult):
        return limits
    payload = marshal.dumps({"code": code, "tests": [], "program": True, **limits.child_config()})
    limit = max_output_bytes + _LAYERS_LINE_BYTES
    output, timed_out, returncode = _execute(payload, timeout_s, limits.mode, limits.file_mb, limit)
    return _program_result(output, timed_out, returncode, limits.mode, timeout_s, max_output_bytes)


def _program_limits(code: object, sandbox: str | None, timeout_s: float,
                    *limits: int | None) -> _Limits | ProgramResult:
    """The limits a program runs under (cpu_s, memory_mb, file_mb, open_files), or the result that refuses it."""
    if not isinstance(code, str):
        return ProgramResult("", False, error="code is not a string")
    mode = resolve_sandbox(sandbox)
    if mode is None:
        return ProgramResult("", False, error=sandbox_refusal(sandbox))
    return _Limits.of(mode, timeout_s, *limits)


def _program_result(output: bytes, timed_out: bool, returncode: int | None, mode: str, timeout_s: float,
                    max_output_bytes: int) -> ProgramResult:
    """A tool call's result from what its process wrote (the layers line first) and how it ended."""
    head, _, printed = output.partition(b"\n") if output.startswith(b"layers ") else (b"", b"", output)
    layers = _MODE_LAYERS[mode] + tuple(x for x in head[7:].decode().split(",") if x)
    truncated = len(printed) > max_output_bytes
    text = printed[:max_output_bytes].decode("utf-8", "replace")
    if returncode in (-signal.SIGXCPU, 128 + signal.SIGXCPU):
        timed_out, error = True, "CPU time limit exceeded"
    elif timed_out:
        error = f"timed out after {timeout_s:g} s"
    elif truncated:
        error = "output limit exceeded"
    elif returncode == 1:
        error = "raised an exception"
    elif returncode != 0:
        error = f"the process ended with exit status {returncode}"
    else:
        error = None
    return ProgramResult(text, error is None, timed_out, truncated, error, layers)


@functools.lru_cache(maxsize=None)
def active_layers(sandbox: str | None = None) -> tuple[str, ...]:
    """The layers a run_tests with this sandbox choice gets here (() where refused), measured once per process."""
    return run_tests("", ["assert True"], sandbox=sandbox or _default_sandbox).layers


def _split_or_reason(test: str, entry_point: str | None) -> SplitTest | str:
    try:
        return split_test(test, entry_point)
    except UnjudgeableTestError as e:
        return f"the test cannot be judged: it {e}"


def use_sandbox(choice: str) -> None:
    """The process's sandbox choice, for the calls that name none (a command's --sandbox, set as it starts)."""
    global _default_sandbox
    if choice not in SANDBOXES:
        raise ValueError(f"sandbox: {choice!r} is not one of {', '.join(SANDBOXES)}")
    _default_sandbox = choice


def resolve_sandbox(choice: str | None = None) -> str | None:
    """The mode a choice gets here: "bwrap", "landlock", or "none" (the user opted out); None where the boundary
    asked for (for "auto": any) does not work on this machine."""
    choice = choice or _default_sandbox
    if choice == "none":
        return "none"
    if choice not in SANDBOXES:
        return None
    return next((b for b in (BOUNDARIES if choice == "auto" else (choice,)) if boundary_works(b)), None)


def sandbox_refusal(choice: str | None = None) -> str | None:
    """None where the choice gets a boundary here, else the one line that says why not and what to install."""
    choice = choice or _default_sandbox
    if resolve_sandbox(choice) is not None:
        return None
    install = {"bwrap": "install bubblewrap (apt-get install bubblewrap) where it may create namespaces",
               "landlock": "r1lab's own needs util-linux's unshare with namespaces allowed, `pip install landlock` "
                           "and a Linux kernel with Landlock (5.13+)"}
    if choice in BOUNDARIES:
        return f"sandbox: {choice!r} does not work on this machine: {install[choice]}"
    if choice not in SANDBOXES:
        return f"sandbox: {choice!r} is not one of {', '.join(SANDBOXES)}"
    return (f"sandbox: model-written code runs only inside an OS boundary, and none works on this machine: "
            f"{install['bwrap']}, or {install['landlock']}; or pass --sandbox none to run it unconfined")


def sandbox_summary(choice: str | None = None) -> str:
    """How the commands that run code end "... run " at start: the sandbox's layers here, or that there are none."""
    mode = resolve_sandbox(choice)
    if mode == "none":
        return "UNCONFINED (--sandbox none): no OS boundary, only the audit hook and resource limits"
    if mode is None:
        return "nowhere: no sandbox boundary works here"
    return f"in the sandbox with {', '.join(active_layers(choice))}"


@functools.lru_cache(maxsize=None)
def boundary_works(mode: str) -> bool:
    """Whether this boundary runs the child here: its tools installed, and allowed to make its namespaces and rules
    (a container may forbid them). Probed with a real, empty run once per process."""
    if mode == "bwrap" and shutil.which("bwrap") is None:
        return False
    if mode == "landlock" and (shutil.which("unshare") is None or _landlock_package() is None):
        return False
    payload = marshal.dumps({"code": "", "tests": [[]], **_Limits(mode, 5, 256, 1, 64).child_config()})
    try:
        output, timed_out, returncode = _execute(payload, _PROBE_TIMEOUT_S, mode, 1)
    except OSError:
        return False
    layers = output.partition(b"\n")[0].split(b" ")[-1].split(b",")  # the child's own first line
    confined = mode != "landlock" or b"landlock" in layers
    return not timed_out and returncode == 0 and b"\n0 ok []\n" in output and confined


@functools.lru_cache(maxsize=1)
def _landlock_package() -> str | None:
    """The directory the `landlock` package is imported from (the child, run with -I -S, has no site-packages)."""
    spec = importlib.util.find_spec("landlock")
    return None if spec is None or spec.origin is None else str(Path(spec.origin).parent.parent)


@dataclass(frozen=True)
class _Limits:
    """What a child runs under; the fork server keeps a pool of servers per distinct value."""

    mode: str  # "bwrap", "landlock" or "none"
    cpu_s: int
    memory_mb: int
    file_mb: int
    open_files: int

    @classmethod
    def of(cls, mode: str, timeout_s: float, cpu_s: int | None, memory_mb: int, file_mb: int, open_files: int):
        return cls(mode, int(cpu_s or math.ceil(timeout_s) + 1), int(memory_mb), int(file_mb), int(open_files))

    def child_config(self) -> dict:
        """The limits and the confinement the child applies to itself (each call's child, under the fork server)."""
        config = {"cpu_s": self.cpu_s, "memory_mb": self.memory_mb, "file_mb": self.file_mb,
                  "open_files": self.open_files, "boundary": self.mode}
        return {**config, "landlock": _landlock_rules()} if self.mode == "landlock" else config


@functools.lru_cache(maxsize=1)
def _landlock_rules() -> dict:
    """What the child may read under Landlock (it writes only its working directory): what bubblewrap would mount,
    the usual devices, and the landlock package."""
    prefix = os.path.realpath(sys.base_prefix)
    return {"package": _landlock_package(), "read_dirs": [d for d in (*_SYSTEM_DIRS, prefix) if os.path.isdir(d)],
            "read_files": [_LOADER_CACHE] if os.path.isfile(_LOADER_CACHE) else [],
            "devices": [d for d in _DEVICES if os.path.exists(d)]}


# util-linux's unshare: the child is the first process of new user (its root mapped to our uid, no capability that
# counts outside), PID, network, IPC and UTS namespaces; all its processes die with it, and it dies with unshare.
_UNSHARE_ARGV = ["unshare", "--user", "--map-root-user", "--fork", "--kill-child", "--pid", "--net", "--ipc", "--uts"]


def _bwrap_argv(file_mb: int) -> list[str]:
    """The bubblewrap command line that runs the child. As root, the child keeps CAP_SETUID/CAP_SETGID only to
    drop to nobody; otherwise bubblewrap runs unprivileged in a user namespace."""
    argv = ["bwrap", "--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try",
            "--die-with-parent", "--new-session"]
    if os.geteuid() == 0:
        argv += ["--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"]
    else:
        argv += ["--unshare-user", "--disable-userns"]
    for path in _SYSTEM_DIRS:
        if os.path.islink(path):
            argv += ["--symlink", os.readlink(path), path]
        elif os.path.isdir(path):
            argv += ["--ro-bind", path, path]
    if os.path.exists(_LOADER_CACHE):
        argv += ["--ro-bind", _LOADER_CACHE, _LOADER_CACHE]
    prefix = os.path.realpath(sys.base_prefix)
    if not any(prefix == d or prefix.startswith(d + "/") for d in _SYSTEM_DIRS):
        for parent in reversed(Path(prefix).parents[:-1]):  # bubblewrap would make them 0700: nobody's dead end
            argv += ["--perms", "0755", "--dir", str(parent)]
        argv += ["--ro-bind", prefix, prefix]
    tmpfs_mb = str(max(file_mb, 1) << 20)
    argv += ["--ro-bind", str(CHILD_SCRIPT), "/r1lab/child.py", "--proc", "/proc", "--dev", "/dev",
             "--perms", "1777", "--size", tmpfs_mb, "--tmpfs", "/tmp",
             "--perms", "1777", "--size", tmpfs_mb, "--tmpfs", "/dev/shm",
             "--perms", "1777", "--size", str(4 * (max(file_mb, 1) << 20)), "--tmpfs", _SANDBOX_DIR,
             "--chdir", _SANDBOX_DIR, "--", os.path.realpath(sys.executable),  # a venv's python is a link
             "-I", "-S", "-B", "/r1lab/child.py"]
    return argv


def _execute(payload: bytes, timeout_s: float, mode: str, file_mb: int,
             max_bytes: int = MAX_OUTPUT_BYTES) -> tuple[bytes, bool, int | None]:
    """(report bytes, timed out, exit status) of one child. The process group and any host directory are gone on
    return, even when an alarm (call_with_timeout) fires meanwhile: it kills the child, and is held back until then."""
    with _held_alarm() as on_alarm:
        workdir = None if mode == "bwrap" else tempfile.mkdtemp(prefix=TEMP_PREFIX)
        proc = None
        try:
            proc = _start_sandboxed(workdir, mode, file_mb)
            on_alarm.append(lambda: _kill_group(proc))
            output, timed_out = _exchange(proc, payload, timeout_s, max_bytes)
        finally:
            _cleanup(proc, workdir)
        return output, timed_out, proc.returncode


def _start_sandboxed(workdir: str | None, mode: str, file_mb: int,
                     extra_argv: tuple[str, ...] = ()) -> subprocess.Popen:
    """The child script in the sandbox (bubblewrap; or unshare, or nothing, around an interpreter working in the
    host directory workdir), in a session of its own, with a minimal environment so that nothing of ours leaks;
    stdin and stdout are pipes to us. -I -S -B: no environment variables, site-packages or .pyc writes."""
    python = [sys.executable, "-I", "-S", "-B", str(CHILD_SCRIPT)]
    argv = _bwrap_argv(file_mb) if mode == "bwrap" else _UNSHARE_ARGV + python if mode == "landlock" else python
    home = _SANDBOX_DIR if mode == "bwrap" else workdir
    return subprocess.Popen([*argv, *extra_argv], cwd=workdir or "/", env={**_ENV, "HOME": home, "TMPDIR": home},
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            start_new_session=True, close_fds=True)


def _exchange(proc: subprocess.Popen, payload: bytes, timeout_s: float,
              max_bytes: int = MAX_OUTPUT_BYTES) -> tuple[bytes, bool]:
    """Write the payload, read the report until EOF, max_bytes or the deadline; (output, timed out)."""
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
                if size > max_bytes:
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
    """SIGKILL the child's whole process group (not reaped yet: its pid, the group id, cannot have been reused)."""
    if proc is None or proc.returncode is not None:
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


def _cleanup(proc: subprocess.Popen | None, workdir: str | None) -> None:
    if proc is not None:
        _kill_group(proc)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=_REAP_TIMEOUT_S)  # a SIGKILLed process exits at once; the bound is for safety
        for pipe in (proc.stdin, proc.stdout):
            if pipe is not None:
                with contextlib.suppress(OSError):
                    pipe.close()
    if workdir is not None:
        shutil.rmtree(workdir, ignore_errors=True)


@contextlib.contextmanager
def _held_alarm() -> Iterator[list[Callable[[], None]]]:
    """Hold back SIGALRM in the block (main thread only): yields a list of callbacks run at once when it fires;
    the previous handler then runs as the block exits, as the signal would have run it."""
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
        if fired and callable(previous):
            previous(signal.SIGALRM, fired[0])
        elif fired and previous == signal.SIG_DFL:
            signal.raise_signal(signal.SIGALRM)


def _judge_report(output: bytes, splits: list, timed_out: bool, returncode: int | None,
                  mode: str) -> SandboxResult:
    """Judge the first line the child wrote for each test; a test with no line, or a failing one, fails."""
    lines = _first_lines(output, len(splits))
    failures = [reason for index, split in enumerate(splits)
                if (reason := split if isinstance(split, str) else _verdict(split, lines.get(index))) is not None]
    passed, error = len(splits) - len(failures), failures[0] if failures else None
    if returncode in (-signal.SIGXCPU, 128 + signal.SIGXCPU):  # killed by it, directly or under bubblewrap
        timed_out, error = True, "CPU time limit exceeded"
    elif timed_out:
        error = "timed out"
    elif "done" not in lines and error is not None:
        error = f"the sandboxed process ended early (exit status {returncode}); first failure: {error}"
    layers = _MODE_LAYERS[mode] + tuple(lines.get("layers", "").split(","))
    return SandboxResult(passed, len(splits), error, timed_out, tuple(x for x in layers if x))


def _first_lines(output: bytes, total: int) -> dict:
    """{test index: "ok VALUES" or "fail REASON", "layers": ..., "done": ""}, the first of each: the first "layers"
    line is the child's own, written before the candidate ran; later (forged) ones and anything else are ignored."""
    lines: dict = {}
    for line in output.decode("utf-8", "replace").splitlines():
        head, _, rest = line.partition(" ")
        key = int(head) if head.isdigit() and int(head) < total else head
        if key in ("layers", "done") or isinstance(key, int):
            lines.setdefault(key, rest)
    return lines


def _verdict(split: SplitTest, line: str | None) -> str | None:
    """None when the test passes on the values of its line, else why not."""
    if line is None:
        return "no result for this test"
    status, _, detail = line.partition(" ")
    if status != "ok":
        return detail or "failed"
    try:
        values = parse_values(detail)
    except ValueError as e:
        return str(e)
    return split.judge(values)


def run_program_pooled(code: str, *, timeout_s: float = 2.0, memory_mb: int = 256, max_output_bytes: int = 1 << 16,
                       cpu_s: int | None = None, file_mb: int = 8, open_files: int = 64,
                       sandbox: str | None = None) -> ProgramResult:
    """run_program through a fork server (see above): the same arguments, limits and result, a few milliseconds a
    call. Thread-safe; never raises for anything the code does, nor when the server fails (an error result)."""
    limits = _program_limits(code, sandbox, timeout_s, cpu_s, memory_mb, file_mb, open_files)
    if isinstance(limits, ProgramResult):
        return limits
    pool = _pool(limits)
    server = pool.acquire()
    try:
        output, timed_out, status = server.call(code, float(timeout_s), max_output_bytes + _LAYERS_LINE_BYTES)
    except (_ServerFailure, OSError) as e:
        return ProgramResult("", False, error=f"the sandbox server failed: {e}")
    finally:
        pool.release(server)
    return _program_result(output, timed_out, status, limits.mode, timeout_s, max_output_bytes)


class _ServerFailure(Exception):
    """The server died, answered nonsense or did not answer in time; retry: nothing of the call ran."""

    def __init__(self, reason: str, retry: bool = False):
        super().__init__(reason)
        self.retry = retry


_STARTER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="r1lab-sandbox-start")
_RESPONSE_HEADER = 14  # b"R", exit status (4 bytes, signed), timed out (1), output length (8)
_SERVER_GRACE_S = 5.0  # past the call's own timeout, which the server enforces: its start, fork, reaping


class _ForkServer:
    """One server process (started on first use, restarted after a failure), used by one thread at a time."""

    def __init__(self, config: _Limits):
        self.config = config
        self.proc: subprocess.Popen | None = None
        self.workdir: str | None = None
        self.pending = b""  # the limits, sent ahead of the first request to a new server

    def call(self, code: str, timeout_s: float, max_bytes: int) -> tuple[bytes, bool, int]:
        """(output, timed out, exit status) of one call. A server found dead, or whose child could not clear the
        previous call's files, is replaced and the call made again, once."""
        for attempt in range(2):
            if self.proc is None or self.proc.poll() is not None:
                self.start()
            try:
                output, timed_out, status = self._exchange(code, timeout_s, max_bytes)
            except _ServerFailure as e:
                self.stop()
                if e.retry and attempt == 0:
                    continue
                raise
            except BaseException:  # an alarm or interrupt mid-exchange: the server's state is unknown
                self.stop()
                raise
            if status != STALE_FILES_STATUS or attempt:
                return output, timed_out, status
            self.stop()
        raise _ServerFailure("unreachable")

    def start(self) -> None:
        self.stop()
        config = self.config
        # named after this process: close_pools removes those of a process gone without stopping its servers (a
        # forked copy of the trainer that ended by os._exit, as multiprocessing's workers do)
        self.workdir = None if config.mode == "bwrap" else tempfile.mkdtemp(prefix=f"{TEMP_PREFIX}{os.getpid()}-")
        # Started from one long-lived thread: bubblewrap's --die-with-parent kills the sandbox when the *thread*
        # that started it ends, and tool calls run on short-lived worker threads.
        self.proc = _STARTER.submit(_start_sandboxed, self.workdir, config.mode, config.file_mb,
                                    (SERVER_FLAG,)).result()
        assert self.proc.stdin is not None
        os.set_blocking(self.proc.stdin.fileno(), False)
        self.pending = _frame(config.child_config())  # sent with the first request, under its deadline

    def stop(self) -> None:
        """Kill the server's process group, reap it, remove its host directory (bubblewrap's vanish with it)."""
        proc, workdir, self.proc, self.workdir = self.proc, self.workdir, None, None
        _cleanup(proc, workdir)

    def _exchange(self, code: str, timeout_s: float, max_bytes: int) -> tuple[bytes, bool, int]:
        assert self.proc is not None and self.proc.stdin is not None and self.proc.stdout is not None
        deadline = time.monotonic() + timeout_s + _SERVER_GRACE_S
        request = self.pending + _frame({"code": code, "timeout_s": timeout_s, "max_bytes": max_bytes})
        self.pending = b""
        with _held_alarm() as on_alarm:
            on_alarm.append(lambda: _kill_group(self.proc))  # kill only: the exchange then fails, and stop() runs
            try:
                _send(self.proc.stdin.fileno(), request, deadline)
            except (BrokenPipeError, ConnectionResetError):
                raise _ServerFailure("it had ended", retry=True) from None
            head = _receive(self.proc.stdout.fileno(), _RESPONSE_HEADER, deadline)
            status, timed_out = int.from_bytes(head[1:5], "big", signed=True), head[5]
            size = int.from_bytes(head[6:], "big")
            if head[:1] != b"R" or timed_out > 1 or size > max_bytes + (1 << 16):
                raise _ServerFailure("it answered nonsense")
            return _receive(self.proc.stdout.fileno(), size, deadline), bool(timed_out), status


def _frame(message: dict) -> bytes:
    data = marshal.dumps(message)
    return len(data).to_bytes(8, "big") + data


def _send(fd: int, data: bytes, deadline: float) -> None:
    view = memoryview(data)
    while view:
        _wait(fd, select.POLLOUT, deadline)
        with contextlib.suppress(BlockingIOError):
            view = view[os.write(fd, view):]


def _receive(fd: int, size: int, deadline: float) -> bytes:
    chunks: list[bytes] = []
    got = 0
    while got < size:
        _wait(fd, select.POLLIN, deadline)
        chunk = os.read(fd, min(size - got, 1 << 16))
        if not chunk:
            raise _ServerFailure("it ended during the call")
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def _wait(fd: int, event: int, deadline: float) -> None:
    """Until fd is ready (or hung up: the read or write that follows says so), or raise at the deadline."""
    poller = select.poll()  # not select.select: a trainer's fds can be past 1024
    poller.register(fd, event)
    left = deadline - time.monotonic()
    if left <= 0 or not poller.poll(left * 1000):
        raise _ServerFailure("it did not answer in time")


class _ServerPool:
    """Servers of one configuration: at most `size`, each used by one thread at a time, started as needed."""

    def __init__(self, config: _Limits, size: int):
        self.config, self.size = config, size
        self.idle: list[_ForkServer] = []
        self.made: list[_ForkServer] = []
        self.ready = threading.Condition()

    def acquire(self) -> _ForkServer:
        with self.ready:
            while not self.idle and len(self.made) >= self.size:
                self.ready.wait()
            if self.idle:
                return self.idle.pop()
            self.made.append(_ForkServer(self.config))
            return self.made[-1]

    def release(self, server: _ForkServer) -> None:
        with self.ready:
            self.idle.append(server)
            self.ready.notify()

    def close(self) -> None:
        """Stop the idle servers' processes (at exit, no call is in flight); a later call starts them again."""
        with self.ready:  # held: no thread takes a server while it is being stopped
            for server in self.idle:
                server.stop()


_POOLS: dict[_Limits, _ServerPool] = {}
_POOLS_LOCK = threading.Lock()


def _pool(config: _Limits) -> _ServerPool:
    with _POOLS_LOCK:
        if config not in _POOLS:
            _POOLS[config] = _ServerPool(config, max(1, os.cpu_count() or 1))
        return _POOLS[config]


def close_pools() -> None:
    """Stop every fork server (registered with atexit; tests call it too), and remove the host directories of
    servers whose process is gone."""
    with _POOLS_LOCK:
        pools = list(_POOLS.values())
    for pool in pools:
        pool.close()
    for path in Path(tempfile.gettempdir()).glob(f"{TEMP_PREFIX}*-*"):
        pid = path.name.removeprefix(TEMP_PREFIX).split("-")[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's
        pass
    return True


def _forget_pools_after_fork() -> None:
    """In a forked copy of this process: the servers and pipes are the parent's, and the starter thread did not
    survive the fork; start afresh, touching nothing of the parent's."""
    global _POOLS_LOCK, _STARTER
    _POOLS.clear()
    _POOLS_LOCK = threading.Lock()
    _STARTER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="r1lab-sandbox-start")


atexit.register(close_pools)
os.register_at_fork(after_in_child=_forget_pools_after_fork)
