"""This process's resident memory: its size now, and the largest size since a caller last asked, sampled every
few milliseconds by a background thread (the kernel's own high-water mark could be reset per phase, but that would
also reset the peak that time -v and the benchmarks read from the process's resource usage).
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

SAMPLE_EVERY_S = 0.002
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
    benchmarks' own: each reads its own), read from /proc (None where there is none)."""

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
