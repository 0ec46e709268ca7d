"""Run untrusted Python (a candidate solution) against assert tests, judging its return values in this process.

The code reward (R1 recipe section 3: "code: run against test cases in a sandbox") executes model output, so the
code is treated as hostile. Two halves:

- r1lab.rewards.sandbox.judge, here: each test `assert candidate(3, 4) == 7` is split into the calls to make
  (`candidate(3, 4)`, literal arguments only) and the verdict (`_ == 7`), which never leaves this process;
- r1lab/rewards/sandbox/child.py, in a separate process: runs the candidate afresh per test, makes that test's calls,
  and sends back the return values as plain data (a restricted literal syntax, size-limited; no pickle). The
  verdict is evaluated here on them. The sandboxed process holds no expected value, nonce or secret, so nothing
  it can read or forge earns a pass: at most it claims return values, and those are judged.

What contains the process, from the outside in. Model-written code runs only inside an OS boundary, one of:

- "bwrap": bubblewrap, when `bwrap` is installed and works here (probed once per process): new mount, PID,
  network, IPC and UTS namespaces; only /usr (and its /lib, /bin links), the Python installation and the child
  script, read-only; a fresh /proc that shows only the sandbox; private size-limited tmpfs for the working
  directory, /tmp and /dev/shm, gone with the process; no /etc, no host /tmp, no view of this process; as root,
  the child drops to uid nobody, and in any case every capability (bubblewrap leaves some inheritable);
- "landlock", r1lab's own where bubblewrap is missing: util-linux's `unshare` makes user (its root mapped to our
  uid), PID, network, IPC and UTS namespaces, and the child, before any candidate code, drops every capability
  (effective, permitted, inheritable, ambient and the bounding set; no new privileges; it stays the namespace's
  uid 0, so that a Python installed under /root stays readable) and confines itself with Landlock (the `landlock`
  package): it may read only /usr, the system library directories, the Python installation, the loader's cache
  and a few devices, execute nothing, and write only its own working directory. Landlock judges the file a call
  reaches, so no path or descriptor trick (dir_fd, fchdir, O_PATH) gets past it; /proc, /tmp and the problem
  files are out of reach.

Where neither works, run_tests and run_program refuse (an error result naming what to install), and the commands
refuse code tasks and --tools at start (sandbox_refusal), unless the user opts out with sandbox "none": then the
child runs with no OS boundary, capabilities dropped, and the audit hook below as its only guard.

Inside every mode:

- its own process group in a new session, killed as a whole in a `finally`, whatever happens here (the PID
  namespace goes with its first process);
- a wall-clock timeout (here) and a CPU-time limit (in the child), address-space, file-size and open-file limits,
  and no core dumps; RLIMIT_NPROC = 0, which forbids forks to every uid but the host's root (exempt even in a
  user namespace: under r1lab's own boundary a process forked by the code dies with its PID namespace, and the
  fork server kills whatever a call left before the next);
- a Python audit hook installed before the candidate runs (r1lab/rewards/sandbox/child.py) that refuses process
  creation, signals, sockets, ctypes, frame/gc introspection, directory fds and writes outside its working
  directory: a second line behind the OS boundary, not a boundary itself (CPython's documentation says as much).

SandboxResult.layers names the layers that took effect: "bwrap", "userns", "netns", "pidns", "landlock", "uid"
(dropped to nobody), "nocaps" (no capability in any set, no new privileges), "audit".

Limits of the design: return values must be plain data: a test of an object the solution returns (a class
instance, a generator) cannot be judged.

The tool calls of a rollout (r1lab/engine/tools.py) run in the same sandbox: the program runs once and what it prints,
rather than a report of return values, comes back; nothing is judged on it. run_program starts a process per call;
run_program_pooled, which the tools use, gets the same result from a fork server.

The fork server. Starting the sandbox (bubblewrap, then a Python interpreter) costs 40-60 ms of CPU, and a GRPO run
with tools makes thousands of calls. So run_program_pooled keeps a pool of servers (one per worker thread, up to the
CPU count, per configuration of limits; stopped at exit): each is started exactly like the one-shot child (the same
namespaces, mounts, its own process group) with `--server`, loads once, and per call forks a child.
The server itself never runs candidate code; what would stop it forking or cannot be undone is applied in each
forked child, before the code runs, in the one-shot child's order: its own process group (killed whole by the
server at the wall-clock timeout or past the output limit), stdio on a fresh pipe and every other fd closed, the
resource limits and the drop of uid or capabilities, the previous call's files cleared (and /tmp, /dev/shm under
bubblewrap; a child that cannot clear them exits, and the server is replaced), a fresh working directory, Landlock
on it (sandbox "landlock"), the audit hook. A call therefore starts from the server's pristine memory: nothing a
call does (globals, monkeypatched modules, files, a hang, a flood, os._exit) reaches the next. The trainer enforces
a deadline on the server too: a server that dies or does not answer is killed, the call in flight gets an error
result, and the next call starts a new server. What the calls of one server share is that they run one after
another in the same namespaces (nothing of a call is left running: it cannot fork, or, run by the host's root
under r1lab's own boundary, what it forked is killed after it).

    from r1lab.rewards.sandbox.runner import run_program, run_tests
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
    """Run code in the sandbox, afresh for each test (an assert statement, see r1lab.rewards.sandbox.judge), make the
    test's calls there and judge the returned values here; never raises for anything the code does. With an
    entry_point, tests may call it as `candidate`. A test the judge cannot split fails alone. cpu_s (a backstop:
    the wall-clock timeout_s normally ends the run first) defaults to timeout_s rounded up, plus one. sandbox: one
    of SANDBOXES, None for the process's choice (use_sandbox); a boundary that does not work here runs nothing and
    fails every test with sandbox_refusal's reason."""
    tests = [str(t) for t in tests]
    if not tests:
        return SandboxResult(0, 0, error="no tests")
    if not isinstance(code, str):
        return SandboxResult(0, len(tests), error="code is not a string")
    mode = resolve_sandbox(sandbox)
    if mode is None:
        return SandboxResult(0, len(tests), error=sandbox_refusal(sandbox))
    splits = [_split_or_reason(t, entry_point) for t in tests]
    payload = marshal.dumps({
        "code": code, "tests": [list(s.calls) if isinstance(s, SplitTest) else [] for s in splits],
        **_child_config(mode, int(cpu_s or math.ceil(timeout_s) + 1), int(memory_mb), int(file_mb), int(open_files)),
    })
    output, timed_out, returncode = _execute(payload, timeout_s, mode, int(file_mb))
    return _judge_report(output, splits, timed_out, returncode, mode)


@dataclass(frozen=True)
class ProgramResult:
    """What a program run by run_program printed, and how it ended."""

    output: str  # stdout and stderr as the program wrote them (an exception's last line included)
    ok: bool  # it ran to its end without an exception, within its limits
    timed_out: bool = False
    truncated: bool = False  # it printed more than max_output_bytes: cut there, the program killed
    error: str | None = None  # why it is not ok, in a few words
    layers: tuple[str, ...] = ()


def run_program(code: str, *, timeout_s: float = 2.0, memory_mb: int = 256, max_output_bytes: int = 1 << 16,
                cpu_s: int | None = None, file_mb: int = 8, open_files: int = 64,
                sandbox: str | None = None) -> ProgramResult:
    """Run a program once in the sandbox (the tool calls of a rollout, r1lab/engine/tools.py) and return what it printed;
    the same isolation and limits as run_tests. Never raises for anything the code does."""
    mode, refused = _program_preflight(code, sandbox)
    if refused is not None:
        return refused
    payload = marshal.dumps({
        "code": code, "tests": [], "program": True,
        **_child_config(mode, int(cpu_s or math.ceil(timeout_s) + 1), int(memory_mb), int(file_mb), int(open_files)),
    })
    limit = max_output_bytes + _LAYERS_LINE_BYTES
    output, timed_out, returncode = _execute(payload, timeout_s, mode, int(file_mb), limit)
    return _program_result(output, timed_out, returncode, mode, timeout_s, max_output_bytes)


def _program_preflight(code: object, sandbox: str | None) -> tuple[str, ProgramResult | None]:
    """(the mode the program runs in, or the result that refuses it before anything starts)."""
    if not isinstance(code, str):
        return "", ProgramResult("", False, error="code is not a string")
    mode = resolve_sandbox(sandbox)
    if mode is None:
        return "", ProgramResult("", False, error=sandbox_refusal(sandbox))
    return mode, None


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
    """The isolation layers a run_tests with this sandbox choice gets on this machine (SandboxResult.layers of an
    empty program; () where it is refused), measured once per process: for the commands to say at start."""
    return run_tests("", ["assert True"], sandbox=sandbox or _default_sandbox).layers


def _split_or_reason(test: str, entry_point: str | None) -> SplitTest | str:
    try:
        return split_test(test, entry_point)
    except UnjudgeableTestError as e:
        return f"the test cannot be judged: it {e}"


# ---------------------------------------------------------------- choosing the boundary


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
    """How the commands that run code end "... run " at start: the layers the sandbox gets here, or that there are
    none."""
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
    payload = marshal.dumps({"code": "", "tests": [[]], **_child_config(mode, 5, 256, 1, 64)})
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


def _child_config(mode: str, cpu_s: int, memory_mb: int, file_mb: int, open_files: int) -> dict:
    """The limits and the confinement the child applies to itself (to each call's child, for the fork server)."""
    config = {"cpu_s": cpu_s, "memory_mb": memory_mb, "file_mb": file_mb, "open_files": open_files, "boundary": mode}
    if mode == "landlock":
        config["landlock"] = _landlock_rules()
    return config


@functools.lru_cache(maxsize=1)
def _landlock_rules() -> dict:
    """What the child may read under Landlock (besides its working directory, its only writable place): what
    bubblewrap would mount, the devices no program does without, and where the landlock package is loaded from."""
    prefix = os.path.realpath(sys.base_prefix)
    return {"package": _landlock_package(), "read_dirs": [d for d in (*_SYSTEM_DIRS, prefix) if os.path.isdir(d)],
            "read_files": [_LOADER_CACHE] if os.path.isfile(_LOADER_CACHE) else [],
            "devices": [d for d in _DEVICES if os.path.exists(d)]}


def _unshare_argv() -> list[str]:
    """util-linux's unshare: the child is the first process of new user, PID, network, IPC and UTS namespaces (all
    its processes die with it), killed if unshare dies. The user namespace maps its root to our uid: the child owns
    what we own (an interpreter under /root included), and no capability it holds there counts outside."""
    return ["unshare", "--user", "--map-root-user", "--fork", "--kill-child", "--pid", "--net", "--ipc", "--uts"]


# ---------------------------------------------------------------- bubblewrap


def _bwrap_argv(file_mb: int) -> list[str]:
    """The bubblewrap command line that runs the child. As root, the child keeps CAP_SETUID/CAP_SETGID only to
    drop to nobody before the candidate runs; otherwise bubblewrap runs unprivileged in a user namespace."""
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


# ---------------------------------------------------------------- the child process


def _execute(payload: bytes, timeout_s: float, mode: str, file_mb: int,
             max_bytes: int = MAX_OUTPUT_BYTES) -> tuple[bytes, bool, int | None]:
    """(report bytes, timed out, exit status) of one child. The process group and any host directory are gone on
    return, even when an alarm (rewards.call_with_timeout) fires meanwhile: it is held back until cleanup is
    done, and kills the child at once so that it is not held back for long."""
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
    host directory workdir), in a session of its own, with a minimal environment; its stdin and stdout are pipes to
    us. -I: no environment variables, no user site, no script directory on sys.path; -S: no site-packages; -B: no
    .pyc writes. A minimal environment, so nothing of ours leaks to the candidate."""
    python = [sys.executable, "-I", "-S", "-B", str(CHILD_SCRIPT)]
    argv = _bwrap_argv(file_mb) if mode == "bwrap" else _unshare_argv() + python if mode == "landlock" else python
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
    """SIGKILL the child's whole process group. The child is not reaped yet, so its pid (= the group id, as it
    leads its own session) cannot have been reused."""
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
    """{test index: "ok VALUES" or "fail REASON", "layers": ..., "done": ""}, the first of each. The first
    "layers" line is the child's own, written before the candidate ran; later ones may be forged and are ignored,
    and so is anything else the candidate wrote."""
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


# ---------------------------------------------------------------- the fork server (tool calls)


def run_program_pooled(code: str, *, timeout_s: float = 2.0, memory_mb: int = 256, max_output_bytes: int = 1 << 16,
                       cpu_s: int | None = None, file_mb: int = 8, open_files: int = 64,
                       sandbox: str | None = None) -> ProgramResult:
    """run_program through a pre-started sandbox (see "The fork server" above): the same arguments, limits and
    result, a few milliseconds a call. Safe from several threads; never raises for anything the code does, nor when
    the server fails (an error result; the next call starts a new one)."""
    mode, refused = _program_preflight(code, sandbox)
    if refused is not None:
        return refused
    config = _ServerConfig(int(cpu_s or math.ceil(timeout_s) + 1), int(memory_mb), int(file_mb), int(open_files), mode)
    pool = _pool(config)
    server = pool.acquire()
    try:
        output, timed_out, status = server.call(code, float(timeout_s), max_output_bytes + _LAYERS_LINE_BYTES)
    except (_ServerFailure, OSError) as e:
        return ProgramResult("", False, error=f"the sandbox server failed: {e}")
    finally:
        pool.release(server)
    return _program_result(output, timed_out, status, mode, timeout_s, max_output_bytes)


@dataclass(frozen=True)
class _ServerConfig:
    """The limits a server's children run under: one pool of servers per distinct configuration."""

    cpu_s: int
    memory_mb: int
    file_mb: int
    open_files: int
    mode: str  # "bwrap", "landlock" or "none"


class _ServerFailure(Exception):
    """The server died, answered nonsense or did not answer in time; retry: nothing of the call can have run."""

    def __init__(self, reason: str, retry: bool = False):
        super().__init__(reason)
        self.retry = retry


_STARTER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="r1lab-sandbox-start")
_RESPONSE_HEADER = 14  # b"R", exit status (4 bytes, signed), timed out (1), output length (8)
_SERVER_GRACE_S = 5.0  # past the call's own timeout, which the server enforces: its start, fork, reaping


class _ForkServer:
    """One server process (started on first use, restarted after a failure) and the calls made through it, one at
    a time: the pool hands it to one thread at once."""

    def __init__(self, config: _ServerConfig):
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
        self.workdir = None if config.mode == "bwrap" else tempfile.mkdtemp(prefix=TEMP_PREFIX)
        # Started from one long-lived thread: bubblewrap's --die-with-parent kills the sandbox when the *thread*
        # that started it ends, and tool calls run on short-lived worker threads.
        self.proc = _STARTER.submit(_start_sandboxed, self.workdir, config.mode, config.file_mb,
                                    (SERVER_FLAG,)).result()
        assert self.proc.stdin is not None
        os.set_blocking(self.proc.stdin.fileno(), False)
        limits = _child_config(config.mode, config.cpu_s, config.memory_mb, config.file_mb, config.open_files)
        self.pending = _frame(limits)  # sent with the first request, under its deadline

    def stop(self) -> None:
        """Kill the server's process group, reap it, remove its host directory (bubblewrap's vanish with it)."""
        proc, workdir, self.proc, self.workdir = self.proc, self.workdir, None, None
        _cleanup(proc, workdir)

    def kill(self) -> None:
        """From a signal handler: kill only; the exchange then fails, and stop() runs."""
        _kill_group(self.proc)

    def _exchange(self, code: str, timeout_s: float, max_bytes: int) -> tuple[bytes, bool, int]:
        assert self.proc is not None and self.proc.stdin is not None and self.proc.stdout is not None
        deadline = time.monotonic() + timeout_s + _SERVER_GRACE_S
        request = self.pending + _frame({"code": code, "timeout_s": timeout_s, "max_bytes": max_bytes})
        self.pending = b""
        with _held_alarm() as on_alarm:
            on_alarm.append(self.kill)
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
    """Servers of one configuration: at most `size`, each used by one thread at a time, started as threads need
    them."""

    def __init__(self, config: _ServerConfig, size: int):
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


_POOLS: dict[_ServerConfig, _ServerPool] = {}
_POOLS_LOCK = threading.Lock()


def _pool(config: _ServerConfig) -> _ServerPool:
    with _POOLS_LOCK:
        if config not in _POOLS:
            _POOLS[config] = _ServerPool(config, max(1, os.cpu_count() or 1))
        return _POOLS[config]


def close_pools() -> None:
    """Stop every fork server (registered with atexit; tests call it too)."""
    with _POOLS_LOCK:
        pools = list(_POOLS.values())
    for pool in pools:
        pool.close()


def _forget_pools_after_fork() -> None:
    """In a forked copy of this process (a data-loader worker, say): the servers and their pipes are the parent's,
    and the starter thread did not survive the fork; start afresh, touching nothing of the parent's."""
    global _POOLS_LOCK, _STARTER
    _POOLS.clear()
    _POOLS_LOCK = threading.Lock()
    _STARTER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="r1lab-sandbox-start")


atexit.register(close_pools)
os.register_at_fork(after_in_child=_forget_pools_after_fork)
