"""The OS boundary of model-written code, on its own: crafted programs that try to write outside their directory
(plainly, through a directory fd, O_PATH, fchdir, raw libc, a forked child), read the problem file or the trainer's
/proc, signal the trainer, or score full marks on a file-based code task without implementing the function.

Each runs with the audit hook in place, and again with the hook and the extension guard left out of the child (a
copy of child.py without them, so that the program may even call libc through ctypes: as if a way around them had
been found), so that what holds is the boundary, bubblewrap or r1lab's own
(namespaces and Landlock). Where no boundary works, the sandbox and the commands refuse, in one line.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from test_sandbox import (BOUNDARY_MODES, ESCAPE_TOKEN, SHARED_DIRS, descendants, host_check,  # noqa: F401: fixtures
                          sandbox_root, shared_dirs_untouched)

from r1lab.cli import main
from r1lab.config import EvalConfig, groups
from r1lab.rewards.sandbox import runner
from r1lab.rewards.sandbox.runner import close_pools, run_program, run_program_pooled, run_tests
from r1lab.rewards.tasks import get_task
from r1lab.train.grpo import sandbox_metrics

SECRET = "EXPECTED-VALUE-5f3a"
HOOKS = ["hook", "no-hook"]


@pytest.fixture
def problem_file(tmp_path: Path) -> Path:
    """A file-based code problem, readable by its owner only (root, where the tests run as root)."""
    path = tmp_path / "problems.jsonl"
    rows = [{"prompt": "Write tag(x).", "entry_point": "tag",
             "tests": [f"assert candidate({i}) == '{SECRET}-{i}'" for i in range(3)]}] * 2
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    path.chmod(0o600)
    return path


@pytest.fixture(params=HOOKS)
def hooked(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """The child as shipped, or a copy of it that never installs its audit hook: the OS boundary alone."""
    close_pools()
    if request.param == "no-hook":
        monkeypatch.setattr(runner, "CHILD_SCRIPT", child_without_guards(tmp_path))
    yield request.param
    close_pools()


def child_without_guards(directory: Path) -> Path:
    """A copy of child.py that installs neither its audit hook nor its guard of extension modules: the candidate may
    import ctypes and call libc, as if it had found a way around both."""
    source = runner.CHILD_SCRIPT.read_text()
    guards = {"sys.addaudithook(hook)": 2,  # the test run and the tool call
              "imp.create_builtin = refuse_builtin": 1, "imp.create_dynamic = guard_extensions(imp.create_dynamic)": 1}
    for guard, count in guards.items():
        assert source.count(guard) == count, guard
        source = source.replace(guard, "pass  # removed: the boundary alone")
    copy = directory / "child_without_guards.py"
    copy.write_text(source)
    return copy


def escapes(problem: Path, linger: bool = True) -> str:
    trainer = os.getpid()
    return f'''
import os
TOKEN, PROBLEM, TRAINER = {ESCAPE_TOKEN!r}, {str(problem)!r}, {trainer}
def attempt(action):
    try:
        return action()
    except BaseException as e:
        return type(e).__name__
def write_plainly():
    open(f'/tmp/{{TOKEN}}-plain', 'w').write('x')
    open(f'/dev/shm/{{TOKEN}}-shm', 'w').write('x')
def write_through_dir_fd():
    fd = os.open('/', os.O_RDONLY | os.O_DIRECTORY)
    os.close(os.open(f'tmp/{{TOKEN}}-dir-fd', os.O_CREAT | os.O_WRONLY, dir_fd=fd))
def write_through_o_path():
    fd = os.open('/tmp', os.O_PATH)
    os.close(os.open(f'{{TOKEN}}-o-path', os.O_CREAT | os.O_WRONLY, dir_fd=fd))
def write_after_fchdir():
    os.mkdir('deep')
    os.chdir('deep')
    fd = os.open('/', os.O_RDONLY | os.O_DIRECTORY)
    os.fchdir(fd)
    open(f'tmp/{{TOKEN}}-fchdir', 'w').write('x')
def write_with_libc():
    import ctypes
    libc = ctypes.CDLL(None)
    return libc.open(f'/tmp/{{TOKEN}}-libc'.encode(), 0o101, 0o644)  # O_WRONLY | O_CREAT
def write_from_a_fork():
    pid = os.fork()
    if pid == 0:
        try:
            open(f'/tmp/{{TOKEN}}-fork', 'w').write('x')
        finally:
            os._exit(0)
    os.waitpid(pid, 0)
def linger():  # out of the call's process group, its output closed: it would outlive the call
    if {linger} and os.fork() == 0:
        os.setsid()
        os.closerange(0, 1024)
        import time
        time.sleep(30)
for action in (write_plainly, write_through_dir_fd, write_through_o_path, write_after_fchdir, write_with_libc,
               write_from_a_fork, linger):
    attempt(action)
def problem():
    return attempt(lambda: open(PROBLEM).read())
def trainer_environ():
    return attempt(lambda: open(f'/proc/{{TRAINER}}/environ', 'rb').read().decode('latin-1'))
def trainer_cmdline():
    return attempt(lambda: open(f'/proc/{{TRAINER}}/cmdline', 'rb').read().decode('latin-1'))
def parent_environ():
    return attempt(lambda: open(f'/proc/{{os.getppid()}}/environ', 'rb').read().decode('latin-1'))
def signal_trainer():
    return attempt(lambda: os.kill(TRAINER, 0))
'''


# the trainer's program as its /proc entry names it (pytest's, or an xdist worker's python)
TRAINER_PROGRAM = Path("/proc/self/cmdline").read_bytes().split(b"\0")[0].decode()
LEAKS = [f"assert {SECRET!r} in problem()", "assert 'PATH=' in trainer_environ()",
         f"assert {TRAINER_PROGRAM!r} in trainer_cmdline()",
         "assert 'PATH=' in parent_environ()", "assert signal_trainer() is None"]


def test_the_escapes_work_where_nothing_contains_them(problem_file: Path, tmp_path: Path) -> None:
    """The control: unconfined (sandbox none) and without the child's guards, every escape succeeds, so the zeros
    and clean directories under the boundaries are theirs, not a broken probe's."""
    close_pools()
    runner_child = runner.CHILD_SCRIPT
    try:
        runner.CHILD_SCRIPT = child_without_guards(tmp_path)
        # all but /proc/<pid>/environ, which needs ptrace access: no capability, no access, even unconfined
        result = run_tests(escapes(problem_file, linger=False), [LEAKS[0], LEAKS[2], LEAKS[4]], sandbox="none")
    finally:
        runner.CHILD_SCRIPT = runner_child
        written = [Path(d) / n for d in SHARED_DIRS for n in os.listdir(d) if n.startswith(ESCAPE_TOKEN)]
        for path in written:
            path.unlink()
    assert (result.passed, result.error) == (3, None)
    assert sorted(p.name.removeprefix(ESCAPE_TOKEN + "-") for p in written) == [
        "dir-fd", "fchdir", "fork", "libc", "o-path", "plain", "shm"]


@pytest.mark.parametrize("mode", BOUNDARY_MODES)
def test_crafted_escapes_reach_nothing_outside(mode: str, hooked: str, problem_file: Path,
                                              shared_dirs_untouched) -> None:  # noqa: F811
    """Nothing written outside the sandbox (shared_dirs_untouched; no process left), nothing read from the problem
    file or the trainer's /proc, no signal reaching the trainer: every test would pass on a leak (the control below)."""
    result = run_tests(escapes(problem_file), LEAKS, sandbox=mode)
    assert result.passed == 0, result.error
    assert "done" not in (result.error or "")
    for directory in SHARED_DIRS:
        assert not [p for p in os.listdir(directory) if ESCAPE_TOKEN in p]


@pytest.mark.parametrize("mode", BOUNDARY_MODES)
def test_tool_calls_write_nothing_outside_and_leave_nothing_for_the_next(mode: str, hooked: str,
                                                                        problem_file: Path) -> None:
    code = escapes(problem_file) + "print(problem(), trainer_environ(), signal_trainer())\n"
    for run in (run_program, run_program_pooled):
        first = run(code, sandbox=mode, timeout_s=5)
        assert SECRET not in first.output and not first.timed_out
        if run is run_program_pooled:  # the server alone is left: nothing of the call runs on into the next
            (server,) = [s for pool in runner._POOLS.values() for s in pool.idle if s.proc is not None]
            # below bubblewrap: its PID namespace's init and the server; below unshare: the server
            assert len(descendants(server.proc.pid)) == {"bwrap": 2, "landlock": 1}[mode]
        after = run(f"import os\ndef names(d):\n    try:\n        return os.listdir(d)\n    except OSError:\n"
                    f"        return []\nprint(sorted(n for d in ('/tmp', '/dev/shm', '..') for n in names(d) "
                    f"if {ESCAPE_TOKEN!r} in n))", sandbox=mode)
        assert after.output == "[]\n", after  # nothing of the first call is visible to the next
    for directory in SHARED_DIRS:
        assert not [p for p in os.listdir(directory) if ESCAPE_TOKEN in p]


KERNEL_VIEW = '''
import ctypes
libc = ctypes.CDLL(None)
class Header(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]
class Data(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]
def no_new_privs():
    return libc.prctl(39, 0, 0, 0, 0)  # PR_GET_NO_NEW_PRIVS
def capabilities():
    data = (Data * 2)()
    assert libc.capget(ctypes.byref(Header(0x20080522, 0)), data) == 0
    return [getattr(d, n) for d in data for n in ("effective", "permitted", "inheritable")]
def ambient():
    return [c for c in range(64) if libc.prctl(47, 1, c, 0, 0) == 1]  # PR_CAP_AMBIENT_IS_SET
def bounding():
    return [c for c in range(64) if libc.prctl(23, c, 0, 0, 0) == 1]  # PR_CAPBSET_READ
'''


@pytest.mark.parametrize("mode", [*BOUNDARY_MODES, "none"])
def test_the_kernel_reports_no_capability_and_no_new_privileges(mode: str, monkeypatch: pytest.MonkeyPatch,
                                                                tmp_path: Path) -> None:
    """Asked of the kernel itself, from a child without its guards (so that it can call libc)."""
    monkeypatch.setattr(runner, "CHILD_SCRIPT", child_without_guards(tmp_path))
    tests = ["assert no_new_privs() == 1", "assert capabilities() == [0, 0, 0, 0, 0, 0]", "assert ambient() == []"]
    if mode != "bwrap" or os.geteuid() != 0:  # bubblewrap keeps CAP_SETUID/CAP_SETGID in the child's bounding set
        tests.append("assert bounding() == []")
    result = run_tests(KERNEL_VIEW, tests, sandbox=mode)
    assert (result.passed, result.error) == (len(tests), None)


CHEAT = '''
import json, os, re
PATHS = [{path!r}]
for source in ('cmdline', 'environ'):  # where a trainer's command line would name its data file
    try:
        PATHS += re.findall(r"[\\w./-]+\\.jsonl", open(f'/proc/{trainer}/' + source).read())
    except OSError:
        pass
TABLE = {{}}
for path in PATHS:
    try:
        lines = open(path).read().splitlines()
    except OSError:
        continue
    for line in lines:
        for test in json.loads(line)['tests']:
            call, expected = re.match(r"assert candidate\\((.*)\\) == (.*)", test).groups()
            TABLE[int(call)] = expected.strip("'")
def tag(x):
    return TABLE.get(x)  # never computed: looked up in the tests' expected values
'''


def cheat_score(problem: Path, mode: str, monkeypatch: pytest.MonkeyPatch) -> float:
    monkeypatch.setattr(runner, "_default_sandbox", mode)  # what a command's --sandbox sets
    task = get_task("code", path=str(problem), test_fraction=0.0)
    return task.score(task.problems("train", 1, seed=0)[0], CHEAT.format(path=str(problem), trainer=os.getpid()))


@pytest.mark.parametrize("mode", BOUNDARY_MODES)
def test_a_program_that_reads_the_tests_instead_of_implementing_scores_zero(mode: str, hooked: str,
                                                                           problem_file: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    assert cheat_score(problem_file, mode, monkeypatch) == 0.0


def test_the_opt_out_is_unconfined_which_is_why_it_must_be_asked_for(problem_file: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """The control of the test above: the same cheat, with no boundary, earns full marks."""
    assert cheat_score(problem_file, "none", monkeypatch) == 1.0


# ---------------------------------------------------------------- without bubblewrap: r1lab's own, or refused


def hide(monkeypatch: pytest.MonkeyPatch, *tools: str):
    """A machine without these tools (their finder finds nothing), probed afresh; the probes are forgotten after."""
    close_pools()
    real_which = runner.shutil.which
    monkeypatch.setattr(runner.shutil, "which", lambda name, *a, **k: None if name in tools
                        else real_which(name, *a, **k))
    caches = (runner.boundary_works, runner.active_layers)
    for cache in caches:
        cache.cache_clear()
    yield
    monkeypatch.undo()
    for cache in caches:
        cache.cache_clear()
    close_pools()


@pytest.fixture
def no_bubblewrap(monkeypatch: pytest.MonkeyPatch):
    yield from hide(monkeypatch, "bwrap")


@pytest.fixture
def no_boundary(monkeypatch: pytest.MonkeyPatch):
    """Neither bubblewrap nor unshare: no boundary works."""
    yield from hide(monkeypatch, "bwrap", "unshare")


@pytest.mark.skipif("landlock" not in BOUNDARY_MODES, reason="r1lab's own boundary does not work here")
def test_without_bubblewrap_auto_takes_r1labs_own_and_the_cheat_still_scores_zero(
        no_bubblewrap, problem_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert runner.resolve_sandbox("auto") == "landlock"
    assert "landlock" in run_tests("", ["assert True"]).layers
    assert cheat_score(problem_file, "auto", monkeypatch) == 0.0


def test_without_a_boundary_nothing_runs(no_boundary, tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    code = f"open({str(marker)!r}, 'w').write('x')\ndef f():\n    return 1\n"
    result = run_tests(code, ["assert f() == 1"])
    assert result.passed == 0 and result.layers == ()
    assert result.error.startswith("sandbox: model-written code runs only inside an OS boundary")
    assert "apt-get install bubblewrap" in result.error and "pip install landlock" in result.error
    assert "\n" not in result.error
    for run in (run_program, run_program_pooled):
        program = run(code)
        assert not program.ok and program.error == result.error
    assert run_tests(code, ["assert f() == 1"], sandbox="bwrap").error == (
        "sandbox: 'bwrap' does not work on this machine: install bubblewrap (apt-get install bubblewrap) where it may "
        "create namespaces")
    assert not marker.exists()
    assert run_tests("def f():\n    return 1\n", ["assert f() == 1"], sandbox="none").passed == 1  # asked for


@pytest.mark.parametrize("argv", [["eval", "--task", "code"], ["sample", "--task", "code"],
                                  ["grpo", "--task", "code"], ["grpo", "--tools", "python"],
                                  ["serve", "--tools", "python"], ["chat", "--tools", "python"],
                                  ["score", "--task", "code"]])
def test_commands_refuse_code_and_tools_at_start_in_one_line(no_boundary, argv: list[str], tmp_path: Path,
                                                             capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, *(["--model", str(tmp_path)] if argv[0] != "score" else [])])
    assert exit_info.value.code == 2
    refusal = [line for line in capsys.readouterr().err.splitlines() if "OS boundary" in line]
    assert len(refusal) == 1 and "apt-get install bubblewrap" in refusal[0] and "--sandbox none" in refusal[0]


def test_the_settings_offer_the_sandbox_choices() -> None:
    assert groups.SANDBOXES == runner.SANDBOXES and EvalConfig().sandbox == "auto"


def test_the_opt_out_starts_and_says_so(no_boundary, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runner, "_default_sandbox", "auto")  # sandbox_metrics sets it: restored after the test
    EvalConfig(task="code", sandbox="none").check()  # no refusal
    with pytest.raises(ValueError, match="OS boundary"):
        EvalConfig(task="code").check()
    EvalConfig(task="arithmetic").check()  # no code runs: nothing to refuse
    lines: list[str] = []
    metrics = sandbox_metrics(get_task("code"), lines.append, "", "none")
    assert metrics == {"sandbox/none": 1.0}  # logged with every step's metrics
    assert lines == ["grpo: code rewards run UNCONFINED (--sandbox none): no OS boundary, only the audit hook and "
                     "resource limits"]
