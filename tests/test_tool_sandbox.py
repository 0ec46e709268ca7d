"""The fork server of tool calls (r1lab.rewards.sandbox.runner.run_program_pooled): run_program's results and isolation per call,
without a process start-up per call."""

from __future__ import annotations

import os
import signal
import tempfile
import threading
import time
from pathlib import Path

import pytest
from test_sandbox import MODES, descendants

from r1lab.rewards.sandbox import runner as sandbox
from r1lab.rewards.sandbox.runner import TEMP_PREFIX, ProgramResult, close_pools, run_program, run_program_pooled


@pytest.fixture(autouse=True)
def fresh_servers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Servers started by the test (their host directories under its own tmp_path) and stopped after it: then no
    process of theirs is left, nor any directory."""
    close_pools()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    before = descendants()
    yield
    close_pools()
    assert descendants() - before == set(), "a sandbox process outlived its server"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(TEMP_PREFIX)] == []


def both(code: str, **kwargs) -> tuple[ProgramResult, ProgramResult]:
    return run_program(code, **kwargs), run_program_pooled(code, **kwargs)


def servers() -> list:
    return [s for pool in sandbox._POOLS.values() for s in pool.idle if s.proc is not None]


@pytest.mark.parametrize("mode", MODES)
def test_results_are_run_programs(mode: str) -> None:
    for code in ["print(6*7)", "print('a')\n1/0", "import sys\nprint('bye')\nsys.exit(0)",
                 "import sys\nsys.exit(2)", "import os\nprint('x', flush=True)\nos._exit(3)"]:
        one, pooled = both(code, sandbox=mode)
        assert pooled == one, code
    assert run_program_pooled("print(6*7)", sandbox=mode).output == "42\n"
    raised = run_program_pooled("print('a')\n1/0", sandbox=mode)
    assert (raised.ok, raised.error, raised.output) == (False, "raised an exception",
                                                        "a\nZeroDivisionError: division by zero\n")
    assert run_program_pooled("import os\nos._exit(3)", sandbox=mode).error == "the process ended with exit status 3"


@pytest.mark.slow
def test_an_infinite_loop_times_out_and_the_next_call_is_quick() -> None:
    slow = run_program_pooled("print('started')\nwhile True: pass", timeout_s=0.5)
    assert (slow.ok, slow.timed_out, slow.output, slow.error) == (False, True, "started\n", "timed out after 0.5 s")
    start = time.monotonic()
    assert run_program_pooled("print(1)", timeout_s=0.5).output == "1\n"
    assert time.monotonic() - start < 0.3


def test_memory_and_output_limits_are_run_programs() -> None:
    one, pooled = both("x = bytearray(600 << 20)\nprint(len(x))", memory_mb=256)
    assert pooled == one and not pooled.ok and "MemoryError" in pooled.output
    one, pooled = both("print('x' * 10000)", max_output_bytes=100)
    assert pooled == one and pooled.truncated and pooled.output == "x" * 100 and not pooled.ok
    assert run_program_pooled("print('x' * 10)", max_output_bytes=100).ok  # the limit ended with that call


@pytest.mark.parametrize("code", [
    "import os\nos.fork()", "import subprocess\nsubprocess.run(['true'])", "import os\nos.system('true')",
    "import socket\nsocket.socket()", "import os, signal\nos.killpg(os.getpgrp(), signal.SIGKILL)",
    "open('/tmp/r1lab-escape-probe', 'w')", "open('../r1lab-escape-probe', 'w')",
])
def test_what_run_program_refuses_is_refused(code: str) -> None:
    one, pooled = both(code)
    assert not pooled.ok and pooled == one, code
    assert run_program_pooled("print('next')").output == "next\n"


# The server's directory as a call lists it; r1lab's own boundary (Landlock) lets a call read only its own directory.
PARENT = "def parent():\n    try:\n        return os.listdir('..')\n    except PermissionError:\n        return ['call-unlisted']\n"


def test_files_of_one_call_are_gone_for_the_next() -> None:
    first = run_program_pooled("import os\nopen('secret', 'w').write('s')\nos.makedirs('a/b/c')\n"
                               "os.chmod('a/b', 0)\nprint(os.getcwd())")
    assert first.ok, first
    second = run_program_pooled(f"import os\n{PARENT}print(os.getcwd() != {first.output.strip()!r}, os.listdir('.'), "
                                f"parent(), os.path.exists({first.output.strip() + '/secret'!r}))")
    assert second.ok and second.output.startswith("True [] ['call-") and second.output.endswith("'] False\n")
    assert len(servers()) == 1  # one server served both calls


def test_a_tree_too_deep_to_clear_costs_a_new_server_not_a_wrong_result() -> None:
    deep = run_program_pooled("import os\nfor _ in range(60):\n    os.mkdir('d')\n    os.chdir('d')\n"
                              "open('secret', 'w').write('s')")
    assert deep.ok, deep
    before = servers()[0].proc.pid
    after = run_program_pooled(f"import os\n{PARENT}print(parent())")
    assert after.ok and after.output.count("call-") == 1
    assert servers()[0].proc.pid != before


def test_state_does_not_leak_between_calls() -> None:
    assert run_program_pooled("import json, builtins\njson.dumps = lambda *a: 'hacked'\n"
                              "builtins.len = lambda x: -1\nglobal X\nX = 1").ok
    after = run_program_pooled("import json\nprint(json.dumps([1]), len('ab'), 'X' in globals())")
    assert after.output == "[1] 2 False\n"


@pytest.mark.slow
def test_a_killed_server_is_replaced() -> None:
    assert run_program_pooled("print(1)").ok
    (server,) = servers()
    os.killpg(server.proc.pid, signal.SIGKILL)
    server.proc.wait()
    assert run_program_pooled("print(2)").output == "2\n"  # between calls: transparent
    results = []
    thread = threading.Thread(target=lambda: results.append(run_program_pooled("while True: pass", timeout_s=5)))
    thread.start()
    time.sleep(0.5)  # the call is in flight
    os.killpg(servers_in_use()[0].proc.pid, signal.SIGKILL)
    thread.join(10)
    assert not results[0].ok and results[0].error.startswith("the sandbox server failed")
    assert run_program_pooled("print(3)").output == "3\n"


def servers_in_use() -> list:
    return [s for pool in sandbox._POOLS.values() for s in pool.made if s not in pool.idle]


def test_concurrent_calls_from_four_threads_get_their_own_outputs() -> None:
    results: dict[int, ProgramResult] = {}

    def call(i: int) -> None:
        results[i] = run_program_pooled(f"import time\ntime.sleep(0.01)\nprint({i} * {i})")

    threads = [threading.Thread(target=call, args=(i,)) for i in range(4 * 5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert {i: r.output for i, r in results.items()} == {i: f"{i * i}\n" for i in range(20)}
    assert len(servers()) <= max(1, os.cpu_count() or 1)


def test_a_server_outlives_the_thread_that_first_used_it() -> None:
    # bubblewrap's --die-with-parent follows the starting thread; tool calls come from short-lived worker threads
    thread = threading.Thread(target=run_program_pooled, args=("print(1)",))
    thread.start()
    thread.join()
    time.sleep(0.2)
    (server,) = servers()
    pid = server.proc.pid
    assert run_program_pooled("print(2)").output == "2\n" and servers()[0].proc.pid == pid


def test_a_forked_copy_of_the_trainer_starts_its_own_servers() -> None:
    assert run_program_pooled("print(1)").ok
    pid = os.fork()
    if pid == 0:  # the copy must neither hang on the parent's starter thread nor talk to the parent's server
        os._exit(0 if run_program_pooled("print(2)", timeout_s=1).output == "2\n" and len(servers()) == 1 else 1)
    assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
    assert run_program_pooled("print(3)").output == "3\n"
