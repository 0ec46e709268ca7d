import sys
import time

import pytest
import torch

from r1lab.phases import PhaseClock


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_each_phase_reports_its_own_time_and_memory_peak():
    clock = PhaseClock(torch.device("cpu"))
    big = torch.ones(300 << 18)  # 300 MB, touched
    time.sleep(0.05)
    del big
    clock.lap("big")
    time.sleep(0.05)
    clock.lap("small")
    clock.lap("big")  # a phase met again adds its time and keeps the larger peak
    m = clock.metrics()
    assert set(m) == {"time/big_s", "time/small_s", "memory/big_peak_gb", "memory/small_peak_gb"}
    assert m["time/big_s"] >= 0.05 and m["time/small_s"] >= 0.05
    assert m["memory/big_peak_gb"] - m["memory/small_peak_gb"] > 0.25  # the tensor was freed before "small"
