"""A clean stop on Ctrl-C or SIGTERM: the step finishes and is checkpointed, then status 128 + the signal's number; a
second Ctrl-C stops at once. SIGTERM is how schedulers preempt a job (SLURM, Kubernetes; torchrun passes it on to the
ranks) before they kill it: a repeated one asks for the same clean stop, since a job's processes may each get it."""

from __future__ import annotations

import os
import signal
import sys
import threading
from pathlib import Path

from r1lab.train.distributed import World

EXIT_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for a process ended by Ctrl-C
STOP_SIGNALS = {signal.SIGINT: "Ctrl-C", signal.SIGTERM: "SIGTERM"}


def exit_now(signum: int | None = None, frame: object = None) -> None:
    """End the process at once, status 130, without unwinding (a cleanup a Ctrl-C would interrupt with a traceback)."""
    print("\nr1lab: stopped at once", file=sys.stderr, flush=True)
    os._exit(EXIT_INTERRUPTED)


class RunStopped(Exception):
    """The command stopped early on request; the message says where and how to go on."""

    def __init__(self, message: str, step: int | None = None, checkpoint: Path | None = None):
        super().__init__(message)
        self.step, self.checkpoint = step, checkpoint
        self.status = 128 + (StopOnInterrupt.asked_by or signal.SIGINT)

    @classmethod
    def at_step(cls, step: int, checkpoint: Path) -> RunStopped:
        return cls(f"stopped by {stop_reason()} after step {step}; checkpoint {checkpoint}; continue with --resume "
                   f"true", step, checkpoint)


def stop_reason() -> str:
    """What asked this process to stop: 'Ctrl-C' or 'SIGTERM'."""
    return STOP_SIGNALS[StopOnInterrupt.asked_by or signal.SIGINT]


class StopOnInterrupt:
    """Within it, SIGINT or SIGTERM asks the run to stop after its step instead of ending it mid-step."""

    # the signal that asked: a multi-stage command stops after the stage (r1lab/commands/stages.py)
    asked_by: signal.Signals | None = None

    def __init__(self) -> None:
        self.asked = False
        self._previous = {}

    def __enter__(self) -> "StopOnInterrupt":
        if threading.current_thread() is threading.main_thread():  # signal handlers belong to the main thread
            self._previous = {signum: signal.signal(signum, self._on_signal) for signum in STOP_SIGNALS}
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, previous in self._previous.items():  # once asked to stop, the process is on its way out
            signal.signal(signum, exit_now if self.asked and signum == signal.SIGINT else previous)
        self._previous = {}

    def _on_signal(self, signum, frame) -> None:
        if self.asked:  # a second Ctrl-C: now (a checkpoint being written stays a .tmp, never taken for one)
            if signum == signal.SIGINT:
                exit_now()
            return
        self.asked, StopOnInterrupt.asked_by = True, signal.Signals(signum)
        print(f"\nr1lab: {STOP_SIGNALS[signum]}: stopping after this step, with a checkpoint (Ctrl-C to stop at "
              f"once)", file=sys.stderr, flush=True)

    def requested(self, world: World = World()) -> bool:
        """Whether any rank was interrupted (every rank calls it after each step)."""
        return world.any(self.asked)
