"""Where a training step's time and memory go: seconds and peak memory per phase, as step metrics.

A phase ends at each lap(name); a name met twice in a step (one per update) adds its seconds and keeps the larger
peak. The peak is the device's: torch's allocator on CUDA; elsewhere the process's resident memory, sampled every
few milliseconds by a background thread (the kernel's own high-water mark could be reset per phase, but that would
also reset the peak that time -v and the benchmarks read from the process's resource usage).
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import torch

SAMPLE_EVERY_S = 0.002


class PhaseClock:
    def __init__(self, device: torch.device):
        self.device, self.seconds, self.peaks = device, {}, {}
        self._sampler = _RssSampler.shared() if device.type != "cuda" else None
        self._take_peak()
        self.t = self.start = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.seconds[name] = self.seconds.get(name, 0.0) + now - self.t
        peak = self._take_peak()
        if peak is not None:
            self.peaks[name] = max(self.peaks.get(name, 0.0), peak)
        self.t = now

    def metrics(self) -> dict:
        """time/NAME_s per phase, and memory/NAME_peak_gb where the peak can be read."""
        return ({f"time/{k}_s": v for k, v in self.seconds.items()}
                | {f"memory/{k}_peak_gb": v / 1e9 for k, v in self.peaks.items()})

    def _take_peak(self) -> float | None:
        """The peak since the last call, and start a new one."""
        if self._sampler is not None:
            return self._sampler.take_peak()
        torch.cuda.synchronize(self.device)
        peak = float(torch.cuda.max_memory_allocated(self.device))
        torch.cuda.reset_peak_memory_stats(self.device)
        return peak


_STATM = Path("/proc/self/statm")
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def resident_bytes() -> int | None:
    """This process's resident set size now, from /proc (None where there is none)."""
    try:
        return int(_STATM.read_text().split()[1]) * _PAGE
    except (OSError, IndexError, ValueError):
        return None


class _RssSampler(threading.Thread):
    """The largest resident set size seen since the last take_peak(channel), per channel (the phases' clock, the
    gradient spares' budget: each reads its own), read from /proc (None where there is none)."""

    _instance = None

    def __init__(self):
        super().__init__(daemon=True, name="r1lab-rss-sampler")
        self.lock = threading.Lock()
        self.start_rss = resident_bytes()
        self.peaks: dict[str, int] = {}

    @classmethod
    def shared(cls) -> "_RssSampler":
        if cls._instance is None:
            cls._instance = cls()
            if cls._instance.start_rss is not None:
                cls._instance.start()
        return cls._instance

    def run(self) -> None:
        while True:
            rss = resident_bytes()
            with self.lock:
                for channel, peak in self.peaks.items():
                    self.peaks[channel] = max(peak, rss)
            time.sleep(SAMPLE_EVERY_S)

    def take_peak(self, channel: str = "phases") -> float | None:
        """The peak since this channel's last call (at its first: the larger of the resident size when the sampler
        started and now), and start a new one."""
        if self.start_rss is None:
            return None
        now = resident_bytes()
        with self.lock:
            peak, self.peaks[channel] = max(self.peaks.get(channel, self.start_rss), now), now
        return float(peak)


def resident_peak(channel: str) -> float | None:
    """The largest resident set size of this process since the last call for channel (None where /proc is
    missing): sampled every SAMPLE_EVERY_S, without resetting the kernel's high-water mark (see above)."""
    return _RssSampler.shared().take_peak(channel)
