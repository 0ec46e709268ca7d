"""The code-execution sandbox: right answers, partial credit, and every escape tried for real and contained.

Each hostile program must earn nothing and leave the host as it was: no process of ours left behind, no file
written outside the sandbox directory, no connection made, this process alive, the temporary directory gone.
"""

from __future__ import annotations

import contextlib
import marshal
import os
import socket
import tempfile
import time
from pathlib import Path

import pytest

from r1lab.rewards.rules import _ScorerTimeout, call_with_timeout
from r1lab.rewards.sandbox import runner as sandbox
from r1lab.rewards.sandbox.judge import UnjudgeableTestError, parse_values, split_test
from r1lab.rewards.sandbox.runner import BOUNDARIES, TEMP_PREFIX, SandboxResult, boundary_works, run_tests

ADD = "def add(a, b):\n    return a + b\n"
ADD_TESTS = ["assert add(1, 2) == 3", "assert add(-1, 1) == 0", "assert add('a', 'b') == 'ab'"]
NOBODY = 65534
# the OS boundaries that work here (CI installs bubblewrap; r1lab's own needs unshare and Landlock), and the opt-out
BOUNDARY_MODES = [mode for mode in BOUNDARIES if boundary_works(mode)]
MODES = [*BOUNDARY_MODES, "none"]  # the audit hook and the limits hold in every mode
SHARED_DIRS = ("/tmp", "/dev/shm")  # world-writable: where an escaped nobody would leave files


def descendants(pid: int | None = None) -> set[int]:
    """Every live process below pid (this process by default), read from /proc."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            parents[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
    found, frontier = set(), {pid or os.getpid()}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


@pytest.fixture
def sandbox_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Sandbox directories go under a directory of this test's own, so leftovers are ours to count."""
    root = tmp_path / "sandboxes"
    root.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(root))
    return root


@pytest.fixture
def host_check(sandbox_root: Path):
    """After the test: no new process below this one and no sandbox directory left."""
    before = descendants()
    yield
    assert descendants() - before == set(), "a sandboxed process outlived its run"
    assert [p.name for p in sandbox_root.iterdir() if p.name.startswith(TEMP_PREFIX)] == []


def shared_entries() -> dict[str, set[tuple[str, int]]]:
    """(name, owner uid) of every entry of the world-writable directories."""
    found: dict[str, set[tuple[str, int]]] = {}
    for directory in SHARED_DIRS:
        found[directory] = set()
        with os.scandir(directory) as entries:
            for entry in entries:
                with contextlib.suppress(OSError):
                    found[directory].add((entry.name, entry.stat(follow_symlinks=False).st_uid))
    return found


@pytest.fixture
def shared_dirs_untouched(host_check):
    """After the test, nothing new in /tmp or /dev/shm that the sandbox could have made: owned by nobody, or named
    with ESCAPE_TOKEN. (Other people's processes share these directories, so a plain diff could flake.)"""
    before = shared_entries()
    yield
    for directory, entries in shared_entries().items():
        new = entries - before[directory]
        assert [name for name, uid in new if uid == NOBODY or ESCAPE_TOKEN in name] == [], directory


ESCAPE_TOKEN = "r1lab-escape-probe"


def hostile(code: str, **kwargs) -> SandboxResult:
    """Run code that tries an escape at module level, with a test that would pass if the code got that far."""
    return run_tests(code, ["assert True"], **kwargs)


# ---------------------------------------------------------------- honest programs


def test_correct_solution_scores_one(host_check) -> None:
    result = run_tests(ADD, ADD_TESTS)
    assert (result.passed, result.total, result.fraction, result.error, result.timed_out) == (3, 3, 1.0, None, False)
    assert result.layers == sandbox.active_layers() and "audit" in result.layers
    assert ("bwrap" in result.layers) == boundary_works("bwrap")  # bubblewrap is used wherever it works


def test_partial_solution_scores_the_fraction_and_each_test_runs(host_check) -> None:
    result = run_tests("def add(a, b):\n    return 5 if a == -1 else a + b\n", ADD_TESTS)
    assert (result.passed, result.total) == (2, 3)  # the failing middle test hides neither neighbour
    assert result.error.startswith("AssertionError")


def test_broken_programs_score_zero(host_check) -> None:
    for code in ["def add(a, b) return a + b", "raise ValueError('at import')", "", "def other(): pass"]:
        result = run_tests(code, ADD_TESTS)
        assert result.passed == 0 and result.total == 3, code
        assert result.error


def test_tests_are_independent_of_each_other(host_check) -> None:
    code = "seen = []\ndef push(x):\n    seen.append(x)\n    return len(seen)\n"
    assert run_tests(code, ["assert push(1) == 1", "assert push(2) == 1"]).passed == 2  # a fresh run per test


def test_a_broken_test_fails_alone(host_check) -> None:
    result = run_tests(ADD, ["assert add(1, 1) == 2", "assert add(1,"])
    assert (result.passed, result.total) == (1, 2)


def test_no_tests() -> None:
    assert run_tests(ADD, []) == SandboxResult(0, 0, error="no tests")


def test_standard_library_imports_work(host_check) -> None:
    code = ("import collections, heapq, itertools, functools, math, re, string, bisect\n"
            "from collections import namedtuple\nfrom dataclasses import dataclass\nP = namedtuple('P', 'x y')\n"
            "def f():\n    return P(1, 2).y + heapq.nsmallest(1, [3, 1])[0] + math.isqrt(16)\n")
    assert run_tests(code, ["assert f() == 7"]).passed == 1


def test_writing_inside_the_sandbox_directory_is_fine(host_check) -> None:
    code = ("import os, tempfile\nos.mkdir('d')\nwith open('d/x.txt', 'w') as f:\n    f.write('hi')\n"
            "os.rename('d/x.txt', 'd/y.txt')\nwith tempfile.NamedTemporaryFile() as t:\n    t.write(b'x')\n"
            "def f():\n    return open('d/y.txt').read()\n")
    assert run_tests(code, ["assert f() == 'hi'"]).passed == 1


def test_printing_and_closing_stdout_cannot_garble_the_report(host_check) -> None:
    code = ("import sys, os\nprint('{\"passed\": 99}\\n' * 1000)\nsys.stderr.write('noise')\nsys.stdout.close()\n"
            "os.close(1)\ndef f():\n    return 1\n")
    result = run_tests(code, ["assert f() == 1", "assert f() == 2"])
    assert (result.passed, result.total) == (1, 2)


# ---------------------------------------------------------------- escapes


@pytest.mark.slow
def test_infinite_loop_returns_within_the_timeout(host_check) -> None:
    for code in ["while True:\n    pass", "import time\ntime.sleep(60)", "def f():\n    while True:\n        pass"]:
        started = time.monotonic()
        result = run_tests(code, ["assert f() == 1"] if "def f" in code else ["assert True"], timeout_s=1.0)
        assert time.monotonic() - started < 2.5, code
        assert result.passed == 0 and result.timed_out


# a second of CPU per mode: the first mode in the fast tier, every one in the whole suite
@pytest.mark.parametrize("mode", [pytest.param(m, marks=[pytest.mark.slow] if i else []) for i, m in enumerate(MODES)])
def test_the_cpu_limit_is_reported_as_a_timeout(mode: str, host_check) -> None:
    result = run_tests("while True:\n    pass", ["assert True"], timeout_s=4.0, cpu_s=1, sandbox=mode)
    assert (result.passed, result.timed_out, result.error) == (0, True, "CPU time limit exceeded")


def test_fork_bomb_is_contained(host_check) -> None:
    result = hostile("import os\nwhile True:\n    os.fork()\n")
    assert result.passed == 0 and not result.timed_out


@pytest.mark.parametrize("code", [
    "import subprocess\nsubprocess.run(['touch', MARKER])",
    "import os\nos.system('touch ' + MARKER)",
    "import os\nos.posix_spawn('/usr/bin/touch', ['touch', MARKER], {})",
    "import os\nos.execv('/usr/bin/touch', ['touch', MARKER])",
    "import pty\npty.fork()\nopen(MARKER, 'w')",
    "import multiprocessing\nmultiprocessing.Process(target=print).start()",
    "import threading\nthreading.Thread(target=lambda: None).start()",
    "import ctypes\nctypes.CDLL(None).fork()",
    "import _posixsubprocess",
])
def test_process_creation_is_refused(code: str, tmp_path: Path, host_check) -> None:
    marker = tmp_path / "spawned"
    result = hostile(f"MARKER = {str(marker)!r}\n{code}\n")
    assert result.passed == 0
    assert not marker.exists()


def test_huge_allocation_hits_the_memory_limit(host_check) -> None:
    started = time.monotonic()
    result = hostile("x = bytearray(8 * 1024 ** 3)", memory_mb=256)
    assert result.passed == 0 and "MemoryError" in result.error
    assert time.monotonic() - started < 2.0
    growing = hostile("xs = []\nwhile True:\n    xs.append(bytearray(10 ** 7))", memory_mb=256)
    assert growing.passed == 0 and not growing.timed_out  # MemoryError, long before the timeout


@pytest.mark.parametrize("attempt", [
    "open(TARGET, 'w').write('x')",
    "open(TARGET, 'a').write('x')",
    "import os\nos.close(os.open(TARGET, os.O_CREAT | os.O_WRONLY))",
    "import pathlib\npathlib.Path(TARGET).write_text('x')",
    "import os\nos.mkdir(TARGET)",
    "import os\nos.symlink('/etc/passwd', 'link')\nopen('link').read()",
    "import os\nopen('inside.txt', 'w').close()\nos.rename('inside.txt', TARGET)",
    "import os\nopen('inside.txt', 'w').close()\nos.link('inside.txt', TARGET)",
    "open('../escaped.txt', 'w').write('x')",
    "import os\nos.chdir('/')\nopen(TARGET.lstrip('/'), 'w').write('x')",
    "import os\nfd = os.open(os.path.dirname(TARGET), os.O_RDONLY)\nos.open('target', os.O_CREAT | os.O_WRONLY, "
    "dir_fd=fd)",
    "import shutil\nshutil.copy('/etc/hostname', TARGET)",
    "import os\nos.mkfifo(TARGET)",
])
def test_writes_outside_the_sandbox_are_refused(attempt: str, tmp_path: Path, sandbox_root: Path,
                                                host_check) -> None:
    target = tmp_path / "target"
    result = hostile(f"TARGET = {str(target)!r}\n{attempt}\n")
    assert result.passed == 0
    assert not target.exists() and not (sandbox_root / "escaped.txt").exists()


def test_files_outside_cannot_be_changed_or_removed(tmp_path: Path, host_check) -> None:
    victim = tmp_path / "victim.txt"
    victim.write_text("intact")
    victim.chmod(0o644)
    for attempt in ["os.remove(V)", "os.chmod(V, 0o777)", "os.truncate(V, 0)", "os.utime(V, (0, 0))",
                    "os.rename(V, V + '.moved')", "shutil.rmtree(os.path.dirname(V))"]:
        result = hostile(f"import os, shutil\nV = {str(victim)!r}\n{attempt}\n")
        assert result.passed == 0, attempt
    assert victim.read_text() == "intact" and victim.stat().st_mode & 0o777 == 0o644


def test_network_is_refused(host_check) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as server:
        server.bind(("127.0.0.1", 0))
        server.listen(8)
        server.settimeout(0.3)
        port = server.getsockname()[1]
        for attempt in ["import socket\nsocket.create_connection(('127.0.0.1', PORT), timeout=1)",
                        "import socket\ns = socket.socket()\ns.connect(('127.0.0.1', PORT))",
                        "import _socket\ns = _socket.socket()\ns.connect(('127.0.0.1', PORT))",
                        "import urllib.request\nurllib.request.urlopen(f'http://127.0.0.1:{PORT}/', timeout=1)"]:
            result = hostile(f"PORT = {port}\n{attempt}\n")
            assert result.passed == 0, attempt
        with pytest.raises(socket.timeout):
            server.accept()  # no connection ever arrived


def test_stdin_does_not_leak_the_tests(host_check) -> None:
    code = "import sys\nleak = sys.stdin.read()\ndef f():\n    return leak\n"
    assert run_tests(code, ["assert 'SECRET-MARKER' in f()"]).passed == 0  # the calls came in on stdin
    code = "def f():\n    return open('/dev/stdin').read()\n"
    assert run_tests(code, ["assert 'SECRET-MARKER' in f()"]).passed == 0


def test_exiting_early_scores_zero(host_check) -> None:
    for code in ["import sys\nsys.exit(0)", "raise SystemExit", "import os\nos._exit(0)", "quit()",
                 "def f():\n    import os\n    os._exit(0)"]:
        result = run_tests(code, ["assert f() is None" if "def f" in code else "assert True"])
        assert result.passed == 0, code


def test_the_parent_cannot_be_killed(host_check) -> None:
    assert hostile("import os\nos.kill(os.getppid(), 9)").passed == 0
    assert hostile("import os, signal\nos.killpg(os.getpgid(os.getppid()), signal.SIGKILL)").passed == 0
    assert hostile("import signal, os\nsignal.pidfd_send_signal(os.pidfd_open(os.getppid()), 9)").passed == 0
    probe = "import os\ndef f():\n    try:\n        os.kill(os.getppid(), 9)\n    except Exception as e:\n" \
            "        return type(e).__name__\n"
    assert run_tests(probe, ["assert f() == 'PermissionError'"]).passed == 1  # the kill itself failed
    os.kill(os.getpid(), 0)  # and here we are


def test_reports_cannot_be_forged(host_check) -> None:
    fake = ("import os\nfor fd in range(64):\n    for line in (b'0 ok\\n', b'x 0 ok\\nx done\\n'):\n"
            "        try:\n            os.write(fd, line)\n        except OSError:\n            pass\n")
    assert run_tests(fake, ["assert False", "assert False"]).passed == 0
    steal = ("import sys\ntry:\n    1 / 0\nexcept ZeroDivisionError as e:\n    frame = e.__traceback__.tb_frame\n")
    assert run_tests(steal, ["assert True"]).passed == 0
    for code in ["import sys\nsys._getframe(1)", "import gc\ngc.get_objects()", "import sys\nsys.settrace(print)",
                 "open('/proc/self/mem', 'rb')", "import signal\nsignal.signal(signal.SIGALRM, print)"]:
        assert run_tests(code, ["assert True"]).passed == 0, code


def test_always_equal_objects_do_not_pass_strict_tests(host_check) -> None:
    code = "class Any:\n    def __eq__(self, other):\n        return True\ndef f():\n    return Any()\n"
    result = run_tests(code, ["assert strict_equal(f(), 3)", "assert strict_equal(f(), [1])"])
    assert result.passed == 0
    rebinding = "import builtins\nbuiltins.sorted = lambda xs: 0\nsorted = lambda xs: 0\ndef f(xs):\n    return 0\n"
    assert run_tests(rebinding, ["assert f([2, 1]) == sorted([2, 1])"]).passed == 0


def test_limits_cannot_be_raised(host_check) -> None:
    code = "import resource\nresource.setrlimit(resource.RLIMIT_AS, (-1, -1))"
    assert hostile(code).passed == 0


CAPABILITY_PROBES = """
import os, resource, tempfile
fd, MINE = tempfile.mkstemp(dir='.')  # each test runs the program afresh, in the same directory
os.close(fd)
os.chmod(MINE, 0)
def attempt(action):
    try:
        action()
        return 'done'
    except OSError as e:
        return type(e).__name__
def read_unreadable():  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH
    return attempt(lambda: open(MINE).read())
def raise_priority():  # CAP_SYS_NICE
    return attempt(lambda: os.nice(-1))
def setuid():  # CAP_SETUID
    return attempt(lambda: os.setresuid(1, 1, 1))
def uid():
    return os.getuid()
def nproc():
    return resource.getrlimit(resource.RLIMIT_NPROC)
"""


@pytest.mark.parametrize("mode", MODES)
def test_the_child_keeps_no_capability(mode: str, host_check) -> None:
    """In every mode the child can do nothing a capability allows: under bubblewrap, root's child is nobody;
    elsewhere it keeps its uid with every capability dropped (a file it owns but made unreadable stays unreadable)."""
    tests = ["assert read_unreadable() == 'PermissionError'", "assert raise_priority() == 'PermissionError'",
             "assert setuid() != 'done'", "assert nproc() == (0, 0)"]
    result = run_tests(CAPABILITY_PROBES, tests, sandbox=mode)
    assert (result.passed, result.error) == (4, None)
    assert "nocaps" in result.layers and ("uid" in result.layers) == (mode == "bwrap" and os.geteuid() == 0)
    if os.geteuid() == 0:
        expected_uid = NOBODY if mode == "bwrap" else 0  # landlock: the user namespace's root, mapped to ours
        assert run_tests(CAPABILITY_PROBES, [f"assert uid() == {expected_uid}"], sandbox=mode).passed == 1


def test_an_alarm_during_a_run_kills_the_child_at_once(host_check) -> None:
    started = time.monotonic()
    with pytest.raises(_ScorerTimeout):
        call_with_timeout(lambda: run_tests("while True:\n    pass", ["assert True"], timeout_s=3.0), 0.3)
    assert time.monotonic() - started < 1.5  # the reward's own timeout wins over the sandbox's longer one


@pytest.mark.slow
def test_many_rewards_in_a_row_leave_nothing_behind(sandbox_root: Path, tmp_path: Path,
                                                    shared_dirs_untouched) -> None:
    """1,000 rewards of good, wrong and hostile code: every result is right and nothing is left over."""
    marker = tmp_path / "escaped"
    programs = [
        (ADD, 3), ("def add(a, b):\n    return b + a\n", 2), ("def add(a, b) return", 0),
        ("import os\nwhile True:\n    os.fork()", 0), (f"open({str(marker)!r}, 'w')", 0),
        ("import os\nos.kill(os.getppid(), 9)", 0), ("import os\nos._exit(0)", 0),
        ("x = bytearray(8 * 1024 ** 3)", 0), ("import sys\nsys.exit()", 0), ("print('x' * 10 ** 6)\n" + ADD, 3),
    ]
    started = time.monotonic()
    for i in range(1000):
        code, expected = programs[i % len(programs)]
        loop = i % 100 == 99  # a few endless loops, each costing the whole (short) timeout
        result = run_tests("while True:\n    pass" if loop else code, ADD_TESTS, timeout_s=0.5 if loop else 2.0)
        assert result.passed == (0 if loop else expected), (i, code, result)
    elapsed = time.monotonic() - started
    print(f"1,000 sandboxed rewards in {elapsed:.1f} s")
    assert not marker.exists()


# ---------------------------------------------------------------- the judge: what the sandbox sees and returns


def test_the_sandboxed_process_never_receives_an_expected_value(monkeypatch: pytest.MonkeyPatch,
                                                                host_check) -> None:
    sent: list[bytes] = []
    execute = sandbox._execute
    monkeypatch.setattr(sandbox, "_execute", lambda payload, *args: sent.append(payload) or execute(payload, *args))
    tests = ["assert f(1) == 'EXPECTED-1'", "assert strict_equal(f(2), 'EXPECTED-2')",
             "assert abs(g(0.5) - 1234.5) < 1e-6", "assert f(3) is not None and f(3) != 'EXPECTED-3'"]
    code = "def f(x):\n    return 'EXP' + f'ECTED-{x}'\ndef g(x):\n    return x + 1000 + 234\n"
    assert run_tests(code, tests).passed == 3  # the last is False for the right answer
    payload = marshal.loads(sent[0])
    assert payload["tests"] == [[("f", (1,), ())], [("f", (2,), ())], [("g", (0.5,), ())],
                                [("f", (3,), ()), ("f", (3,), ())]]
    assert b"EXPECTED" not in sent[0] and b"1234" not in sent[0]


@pytest.mark.parametrize(("test", "calls"), [
    ("assert candidate(3, 4) == 7", [("add", (3, 4), ())]),
    ("assert add(3, b=[1, (2,)]) == 7", [("add", (3,), (("b", [1, (2,)]),))]),
    ("assert abs(candidate(0.1, 0.2) - 0.3) < 1e-9", [("add", (0.1, 0.2), ())]),
    ("assert candidate(1, 1)", [("add", (1, 1), ())]),
    ("assert not candidate(0, 0)", [("add", (0, 0), ())]),
    ("assert candidate(None, -1) is None, 'message'", [("add", (None, -1), ())]),
    ("assert strict_equal(sorted(candidate({1: 2}, {3})), [1, 3])", [("add", ({1: 2}, {3}), ())]),
    ("assert math.isclose(candidate(1e-3, 0.0), 1e-3) and len(add('a', 'b')) == 2",
     [("add", (1e-3, 0.0), ()), ("add", ("a", "b"), ())]),
    ("assert True", []),
])
def test_the_judge_splits_the_usual_test_shapes(test: str, calls: list) -> None:
    assert list(split_test(test, "add").calls) == calls


@pytest.mark.parametrize(("test", "why"), [
    ("x = candidate(1)", "single assert"),
    ("assert candidate(1) == 1\nassert candidate(2) == 2", "single assert"),
    ("assert candidate(sorted([3, 1])) == 1", "not a literal"),
    ("assert candidate(*[1]) == 1", "not a literal"),
    ("assert candidate(**{'a': 1}) == 1", r"\*\*keywords"),
    ("assert [candidate(i) for i in range(3)] == [0, 1, 2]", "not a literal"),
    ("assert candidate(1).real == 1", "attribute .real"),
    ("assert result == 1", "name 'result'"),
    ("assert (lambda: 1)() == 1", "named function"),
    ("assert __import__('os').system('true') == 0", r"\.system"),
    ("assert (", "does not compile"),
])
def test_the_judge_refuses_what_it_cannot_split(test: str, why: str) -> None:
    with pytest.raises(UnjudgeableTestError, match=why):
        split_test(test, "candidate_fn")


def test_the_judge_compares_strictly_and_guards_its_own_work() -> None:
    def judged(test: str, *values) -> str | None:
        return split_test(test, "f").judge(list(values))

    assert judged("assert f(1) == 2", 2) is None
    assert judged("assert f(1) == 2", 2.0) is not None  # == is strict_equal: an int is wanted
    assert judged("assert f(1) == 0.3", 0.1 + 0.2) is None  # floats within 1e-9 relative
    assert judged("assert f(1) != [1]", (1,)) is None
    assert judged("assert f(1) is True", 1) is not None
    assert judged("assert 1 < f(1) == 2 < 3", 2) is None
    assert judged("assert abs(f(1) - 2.5) < 1e-6", "2.5").startswith("TypeError")
    started = time.monotonic()
    assert "refuses" in judged("assert 'x' * f(1) == ''", 10 ** 12)
    assert "refuses" in judged("assert 2 ** f(1) > 0", 10 ** 12)
    assert "refuses" in judged("assert 1 << f(1) > 0", 10 ** 12)
    assert judged("assert '%*d' % (f(1), 1) == ''", 10 ** 9) is not None
    assert time.monotonic() - started < 1.0


@pytest.mark.parametrize("text", ["[__import__('os')]", "[(1).__class__]", "[f(1)]", "[x]", "[1 + 1]", "{1: 2}",
                                  "[" * 300 + "]" * 300, "[lambda: 1]", "['a' 'b', 'c']"])
def test_returned_values_are_parsed_never_run(text: str) -> None:
    if text == "['a' 'b', 'c']":
        assert parse_values(text) == ["ab", "c"]  # implicit concatenation is still a plain constant
        return
    with pytest.raises(ValueError):
        parse_values(text)


# ---------------------------------------------------------------- forging a pass, with every layer in place

GC_FRAME_WALK = '''
import importlib, os
ERR = None
def steal():
    gc = importlib.import_module('gc')
    gc.set_debug(gc.DEBUG_SAVEALL)
    def cycle():
        try:
            1 / 0
        except ZeroDivisionError as e:
            e.keep = e
    cycle()
    gc.collect()
    found = set()
    for obj in list(gc.garbage):
        frame = getattr(obj, '__traceback__', None) and obj.__traceback__.tb_frame
        while frame is not None:
            found |= {v for v in frame.f_locals.values() if isinstance(v, str)}
            frame = frame.f_back
    for fd in range(64):
        for s in found:
            try:
                os.write(fd, f'0 ok [{s!r}]\\n'.encode())
            except OSError:
                pass
try:
    steal()
except BaseException as e:
    ERR = type(e).__name__
def f():
    return 'wrong'
def why():
    return ERR
'''


@pytest.mark.parametrize("mode", MODES)
def test_gc_frames_reached_through_importlib_earn_nothing(mode: str, shared_dirs_untouched) -> None:
    result = run_tests(GC_FRAME_WALK, ["assert f() == 'EXPECTED-VALUE-9d1c'", "assert why() == 'ImportError'"],
                       sandbox=mode)
    assert (result.passed, result.total) == (1, 2)  # no pass forged; the gc import itself was refused
    assert "audit" in result.layers


DIR_FD_ESCAPES = '''
import os
TOKEN = 'r1lab-escape-probe'
def attempts():
    opened = []
    root = os.getcwd()
    for i in range(12):
        os.mkdir(f'd{i}')
        os.chdir(f'd{i}')
    up = '../' * 12
    targets = [('proc/self/mem', os.O_RDONLY), (f'proc/{os.getppid()}/environ', os.O_RDONLY),
               (f'tmp/{TOKEN}-tmp', os.O_WRONLY | os.O_CREAT), (f'dev/shm/{TOKEN}-shm', os.O_WRONLY | os.O_CREAT)]
    for how in ('root', 'O_DIRECTORY', 'O_PATH', 'tmpfile'):
        try:
            flags = {'root': os.O_RDONLY, 'O_DIRECTORY': os.O_RDONLY | os.O_DIRECTORY, 'O_PATH': os.O_PATH,
                     'tmpfile': os.O_TMPFILE | os.O_RDWR}[how]
            dir_fd = os.open(root, flags)
        except OSError:
            continue
        for path, target_flags in targets:
            try:
                os.close(os.open(up + path, target_flags, dir_fd=dir_fd))
                opened.append((how, path))
            except OSError:
                pass
    for path, target_flags in targets:  # and plainly, in case the sandbox's root is the host's
        try:
            os.close(os.open('/' + path, target_flags))
            opened.append(('absolute', path))
        except OSError:
            pass
    return opened
'''


@pytest.mark.parametrize("mode", MODES)
def test_dir_fd_opens_from_a_deep_directory_reach_nothing(mode: str, shared_dirs_untouched) -> None:
    result = run_tests(DIR_FD_ESCAPES, ["assert attempts() == []"], sandbox=mode)
    assert result.passed == 1, result.error
    for directory in SHARED_DIRS:
        assert not [p for p in os.listdir(directory) if ESCAPE_TOKEN in p]


@pytest.mark.parametrize("mode", MODES)
def test_only_plain_data_comes_back(mode: str, shared_dirs_untouched) -> None:
    always_equal = ("class Any:\n    def __eq__(self, other):\n        return True\n    __hash__ = None\n"
                    "class Int(int):\n    def __eq__(self, other):\n        return True\n"
                    "import builtins\nbuiltins.abs = lambda x: 0\n"
                    "def f(x):\n    return Any()\ndef g(x):\n    return Int(5)\ndef h(x):\n    return [Int(5)]\n"
                    "def gen(x):\n    return (i for i in range(3))\n")
    tests = ["assert f(1) == 3", "assert g(1) == 3", "assert h(1) == [3]", "assert abs(g(1) - 3) < 1",
             "assert gen(1) == [0, 1, 2]", "assert f(1)"]
    result = run_tests(always_equal, tests, sandbox=mode)
    assert result.passed == 0 and "only plain data" in result.error


@pytest.mark.parametrize("mode", MODES)
def test_huge_or_deep_outputs_fail_fast(mode: str, shared_dirs_untouched) -> None:
    code = ("def big():\n    return 'x' * 10 ** 7\ndef many():\n    return list(range(10 ** 6))\n"
            "def deep():\n    x = []\n    for _ in range(10 ** 4):\n        x = [x]\n    return x\n"
            "def digits():\n    return 10 ** 100000\n"
            "def loop():\n    x = []\n    x.append(x)\n    return x\n")
    started = time.monotonic()
    result = run_tests(code, ["assert big() == ''", "assert len(many()) == 10 ** 6", "assert deep() == []",
                              "assert digits() > 0", "assert loop() == []"], sandbox=mode, timeout_s=5.0)
    assert result.passed == 0 and not result.timed_out
    assert time.monotonic() - started < 4.0


@pytest.mark.parametrize("mode", MODES)
def test_printed_or_written_fake_results_earn_nothing(mode: str, shared_dirs_untouched) -> None:
    code = ("import os, sys\nfor fd in range(64):\n    for line in (b'0 ok [3]\\n', b'layers forged\\n', b'done\\n'):\n"
            "        try:\n            os.write(fd, line)\n        except OSError:\n            pass\n"
            "print('0 ok [3]')\ndef f():\n    return 1\n")
    result = run_tests(code, ["assert f() == 'EXPECTED-31f0'"], sandbox=mode)
    assert result.passed == 0 and "forged" not in result.layers
    exits = run_tests("import os\ndef f():\n    os.write(3, b'0 ok [\"x\"]\\n')\n    os._exit(0)\n",
                      ["assert f() == 'EXPECTED-31f0'"], sandbox=mode)
    assert exits.passed == 0


def test_a_candidate_rebinding_builtins_cannot_change_the_verdict(shared_dirs_untouched) -> None:
    code = ("import builtins\nbuiltins.sorted = lambda *a, **k: [1, 2, 3]\nbuiltins.len = lambda x: 3\n"
            "builtins.isinstance = lambda *a: True\ndef f():\n    return [3, 2]\n")
    tests = ["assert sorted(f()) == [1, 2, 3]", "assert len(f()) == 3", "assert isinstance(f(), str)"]
    assert run_tests(code, tests).passed == 0  # the judge's helpers live in the trainer's process


@pytest.mark.parametrize("mode", BOUNDARY_MODES)
def test_the_boundary_hides_host_temp_files_and_processes(mode: str, shared_dirs_untouched) -> None:
    visible = Path("/tmp") / f"r1lab-host-only-{os.getpid()}"
    visible.write_text("x")
    code = ("import os\ndef look():\n    seen = []\n    for d in ('/tmp', '/dev/shm'):\n"
            "        try:\n            seen += os.listdir(d)\n        except OSError:\n            pass\n"
            "    return seen\ndef ppid():\n    return os.getppid()\n")
    try:
        result = run_tests(code, [f"assert {visible.name!r} not in look()", "assert ppid() in (0, 1)"], sandbox=mode)
    finally:
        visible.unlink()
    # bubblewrap: a private /tmp and /dev/shm; Landlock: no reading them. In a PID namespace the parent is its init
    # (bubblewrap) or none at all (the child is the first process, under unshare)
    assert result.passed == 2, result.error


UNAUDITED_ROUTES = '''
import importlib, importlib.util, math, os
def imported(name):
    try:
        importlib.import_module(name)
        return 'imported'
    except BaseException as e:
        return type(e).__name__
def own_library():
    with open('lib.so', 'wb') as f:
        f.write(open(math.__file__, 'rb').read())
    try:
        importlib.util.module_from_spec(importlib.util.spec_from_file_location('math', os.path.abspath('lib.so')))
        return 'loaded'
    except BaseException as e:
        return type(e).__name__
def shm():
    try:
        import _posixshmem
        _posixshmem.shm_open('/r1lab-escape-probe-shm-open', os.O_CREAT | os.O_RDWR, 0o600)
        return 'created'
    except BaseException as e:
        return type(e).__name__
'''


@pytest.mark.parametrize("mode", MODES)
def test_imports_that_raise_no_audit_event_are_refused(mode: str, shared_dirs_untouched) -> None:
    """importlib re-imports a cached extension (the fallback's own _ctypes) with no event, loads a library the
    candidate wrote, and _posixshmem creates /dev/shm files with no "open" event."""
    tests = ["assert imported('_ctypes') == 'ImportError'", "assert imported('gc') == 'ImportError'",
             "assert imported('_posixsubprocess') == 'ImportError'", "assert own_library() == 'ImportError'",
             "assert shm() == 'ImportError'", "assert imported('_json') == 'imported'"]
    result = run_tests(UNAUDITED_ROUTES, tests, sandbox=mode)
    assert result.passed == len(tests), result.error
