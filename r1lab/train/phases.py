"""Seconds and peak memory per phase of a training step (ended by lap(name)): torch's allocator peak on CUDA, else
the resident memory sampled by a thread (resetting the kernel's high-water mark would upset time -v).
"""

from __future__ import annotations

import time

import torch

from r1lab.cpu.memory import _RssSampler


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
