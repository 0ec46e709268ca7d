"""A clean stop on Ctrl-C: the step finishes and is checkpointed, then status 130; a second Ctrl-C stops at once."""

from __future__ import annotations

import os
import signal
import sys
import threading
from pathlib import Path

from r1lab.train.distributed import World

EXIT_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for a process ended by Ctrl-C


def exit_now(signum: int | None = None, frame: object = None) -> None:
    """End the process at once, status 130, without unwinding (a cleanup a Ctrl-C would interrupt with a traceback)."""
    print("\nr1lab: stopped at once", file=sys.stderr, flush=True)
    os._exit(EXIT_INTERRUPTED)


class RunStopped(Exception):
    """The command stopped early on request; the message says where and how to go on."""

    def __init__(self, message: str, step: int | None = None, checkpoint: Path | None = None):
        super().__init__(message)
        self.step, self.checkpoint = step, checkpoint

    @classmethod
    def at_step(cls, step: int, checkpoint: Path) -> RunStopped:
        return cls(f"stopped by Ctrl-C after step {step}; checkpoint {checkpoint}; continue with --resume true",
                   step, checkpoint)


class StopOnInterrupt:
    """Within it, SIGINT asks the run to stop after its step instead of raising KeyboardInterrupt mid-step."""

    # set by a Ctrl-C: a multi-stage command stops after the stage (r1lab/commands/stages.py)
    asked_in_process = False

    def __init__(self) -> None:
        self.asked = False
        self._previous = None

    def __enter__(self) -> "StopOnInterrupt":
        if threading.current_thread() is threading.main_thread():  # signal handlers belong to the main thread
            self._previous = signal.signal(signal.SIGINT, self._on_interrupt)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._previous is not None:  # once asked to stop, the process is on its way out: a Ctrl-C ends it
            signal.signal(signal.SIGINT, exit_now if self.asked else self._previous)
            self._previous = None

    def _on_interrupt(self, signum, frame) -> None:
        if self.asked:  # the second Ctrl-C: now (a checkpoint being written stays a .tmp, never taken for one)
            exit_now()
        self.asked = StopOnInterrupt.asked_in_process = True
        print("\nr1lab: Ctrl-C: stopping after this step, with a checkpoint (Ctrl-C again to stop at once)",
              file=sys.stderr, flush=True)

    def requested(self, world: World = World()) -> bool:
        """Whether any rank was interrupted (every rank calls it after each step)."""
        return world.any(self.asked)
