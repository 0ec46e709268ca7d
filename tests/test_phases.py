import mmap
import sys
import time

import pytest
import torch

from r1lab.train.phases import PhaseClock


def touch_and_release(megabytes: int) -> None:
    """Make megabytes resident and give them back: an anonymous map of its own, whatever the allocator keeps."""
    block = mmap.mmap(-1, megabytes << 20)
    page = b"\x01" * (1 << 20)
    for _ in range(megabytes):
        block.write(page)
    time.sleep(0.05)
    block.close()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_each_phase_reports_its_own_time_and_memory_peak():
    clock = PhaseClock(torch.device("cpu"))
    touch_and_release(300)
    clock.lap("big")
    time.sleep(0.05)
    clock.lap("small")
    clock.lap("big")  # a phase met again adds its time and keeps the larger peak
    m = clock.metrics()
    assert set(m) == {"time/big_s", "time/small_s", "memory/big_peak_gb", "memory/small_peak_gb"}
    assert m["time/big_s"] >= 0.05 and m["time/small_s"] >= 0.05
    assert m["memory/big_peak_gb"] - m["memory/small_peak_gb"] > 0.25  # the block was released before "small"
