"""Per-call cost of a tool call: run_program (a sandboxed process per call) against run_program_pooled (the fork
server, r1lab/rewards/sandbox/runner.py): wall time per call over N sequential calls after one warm-up call, in each
boundary that works here (bubblewrap, r1lab's own: unshare and Landlock) and unconfined (sandbox none). Wall time
only: processes reaped inside the sandbox's PID namespace are not counted in this process's CPU times. The load
average is printed because other jobs skew the figures.

    python bench/tool_calls.py [N]
"""

from __future__ import annotations

import os
import sys
import time

from r1lab.rewards.sandbox.runner import BOUNDARIES, boundary_works, close_pools, run_program, run_program_pooled

CODE = "x = 123 * 456\nprint(x)"


def measure(run, calls: int, mode: str) -> float:
    """Wall milliseconds per call."""
    assert run(CODE, sandbox=mode).output == "56088\n"  # the warm-up starts the server, for the pooled path
    start = time.perf_counter()
    for _ in range(calls):
        run(CODE, sandbox=mode)
    wall = time.perf_counter() - start
    close_pools()
    return 1000 * wall / calls


def main() -> None:
    calls = int(sys.argv[1]) if len(sys.argv) > 1 else 50
    print(f"{calls} calls each; load average before: {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")
    for mode in [*(m for m in BOUNDARIES if boundary_works(m)), "none"]:
        for name, run in (("run_program (process per call)", run_program),
                          ("run_program_pooled (fork server)", run_program_pooled)):
            print(f"{mode:9s} {name:34s} {measure(run, calls, mode):6.1f} ms/call")
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
