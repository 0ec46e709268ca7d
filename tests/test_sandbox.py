"""The code-execution sandbox: right answers, partial credit, and every escape tried for real and contained.

Each hostile program must earn nothing and leave the host as it was: no process of ours left behind, no file
written outside the sandbox directory, no connection made, this process alive, the temporary directory gone.
"""

from __future__ import annotations

import os
import socket
import tempfile
import time
from pathlib import Path

import pytest

from r1lab.rewards import _ScorerTimeout, call_with_timeout
from r1lab.sandbox import TEMP_PREFIX, SandboxResult, run_tests

ADD = "def add(a, b):\n    return a + b\n"
ADD_TESTS = ["assert add(1, 2) == 3", "assert add(-1, 1) == 0", "assert add('a', 'b') == 'ab'"]
NOBODY = 65534


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


def hostile(code: str, **kwargs) -> SandboxResult:
    """Run code that tries an escape at module level, with a test that would pass if the code got that far."""
    return run_tests(code, ["assert True"], **kwargs)


# ---------------------------------------------------------------- honest programs


def test_correct_solution_scores_one(host_check) -> None:
    result = run_tests(ADD, ADD_TESTS)
    assert (result.passed, result.total, result.fraction, result.error, result.timed_out) == (3, 3, 1.0, None, False)


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


def test_infinite_loop_returns_within_the_timeout(host_check) -> None:
    for code in ["while True:\n    pass", "import time\ntime.sleep(60)", "def f():\n    while True:\n        pass"]:
        started = time.monotonic()
        result = run_tests(code, ["assert f() == 1"] if "def f" in code else ["assert True"], timeout_s=1.0)
        assert time.monotonic() - started < 2.5, code
        assert result.passed == 0 and result.timed_out


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
    assert run_tests(code, ["assert 'SECRET-MARKER' in f()"]).passed == 0  # the tests came in on stdin
    assert run_tests("leak = open('/dev/stdin').read()", ["assert 'SECRET-MARKER' in leak"]).passed == 0


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


@pytest.mark.skipif(os.geteuid() != 0, reason="the uid drop and network namespace are for root only")
def test_root_runs_the_code_as_nobody_without_forks() -> None:
    code = "import os, resource\ninfo = (os.getuid(), os.geteuid(), resource.getrlimit(resource.RLIMIT_NPROC))\n"
    result = run_tests(code, [f"assert info == ({NOBODY}, {NOBODY}, (0, 0)), info"])
    if "uid" not in result.layers:
        pytest.skip("this machine refused the uid drop; the audit hook alone contains the code")
    assert result.passed == 1


def test_an_alarm_during_a_run_kills_the_child_at_once(host_check) -> None:
    started = time.monotonic()
    with pytest.raises(_ScorerTimeout):
        call_with_timeout(lambda: run_tests("while True:\n    pass", ["assert True"], timeout_s=3.0), 0.3)
    assert time.monotonic() - started < 1.5  # the reward's own timeout wins over the sandbox's longer one


def test_many_rewards_in_a_row_leave_nothing_behind(sandbox_root: Path, tmp_path: Path, host_check) -> None:
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
