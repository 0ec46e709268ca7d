"""This process's resident memory now, and its peak since the last ask, sampled by a background thread (resetting
the kernel's high-water mark would also reset the peak that time -v reads).
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
    try:
        return int(_STATM.read_text().split()[1]) * _PAGE
    except (OSError, IndexError, ValueError):
        return None


class _RssSampler(threading.Thread):
    """The largest resident set size seen since the last take_peak()."""

    _instance = None

    def __init__(self):
        super().__init__(daemon=True, name="r1lab-rss-sampler")
        self.lock = threading.Lock()
        self.start_rss = resident_bytes()
        self.peak: int | None = None  # None until the first take_peak

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
                if self.peak is not None:
                    self.peak = max(self.peak, rss)
            time.sleep(SAMPLE_EVERY_S)

    def take_peak(self) -> float | None:
        """The peak since the last call (or since the sampler started), and start a new one."""
        if self.start_rss is None:
            return None
        now = resident_bytes()
        with self.lock:
            peak, self.peak = max(self.start_rss if self.peak is None else self.peak, now), now
        return float(peak)
