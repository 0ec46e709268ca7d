"""Where a training step's time and memory go: seconds and peak memory per phase, as step metrics.

A phase ends at each lap(name); a name met twice in a step (one per update) adds its seconds and keeps the larger
peak. The peak is the device's: torch's allocator on CUDA, the process's resident memory elsewhere (Linux resets its
high-water mark on request, so each phase's peak is its own).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

_CLEAR_REFS, _STATUS = Path("/proc/self/clear_refs"), Path("/proc/self/status")


class PhaseClock:
    def __init__(self, device: torch.device):
        self.device, self.seconds, self.peaks = device, {}, {}
        self._reset_peak()
        self.t = self.start = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.seconds[name] = self.seconds.get(name, 0.0) + now - self.t
        peak = self._peak()
        if peak is not None:
            self.peaks[name] = max(self.peaks.get(name, 0.0), peak)
        self._reset_peak()
        self.t = now

    def metrics(self) -> dict:
        """time/NAME_s per phase, and memory/NAME_peak_gb where the peak can be read."""
        return ({f"time/{k}_s": v for k, v in self.seconds.items()}
                | {f"memory/{k}_peak_gb": v / 1e9 for k, v in self.peaks.items()})

    def _peak(self) -> float | None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return float(torch.cuda.max_memory_allocated(self.device))
        try:
            line = next(x for x in _STATUS.read_text().splitlines() if x.startswith("VmHWM:"))
        except (OSError, StopIteration):
            return None
        return int(line.split()[1]) * 1024.0

    def _reset_peak(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        try:
            _CLEAR_REFS.write_text("5")  # Linux: reset VmHWM to the current resident size
        except OSError:
            pass
