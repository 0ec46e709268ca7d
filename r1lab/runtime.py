"""Process set-up for training commands: CPU threads and the C allocator.

glibc returns freed memory to the operating system past a trim threshold, and serves large blocks with fresh
mmaps, so a CPU training step that frees and re-allocates the same tens of megabytes each step pays for page faults
on memory it just gave back: a tenth or more of a GRPO step, and most of its run-to-run variance. A training
process reaches its peak every step anyway, so it keeps what it freed.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

import torch

_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_MAX = -1, -2, -4  # glibc's malloc.h


def keep_freed_memory() -> bool:
    """Ask glibc to reuse freed memory instead of returning it; False where the C library is not glibc."""
    if not sys.platform.startswith("linux") or sys.maxsize <= 2**32:
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        settings = ((_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, 2**62), (_M_TOP_PAD, 64 << 20))
        return all(libc.mallopt(option, value) == 1 for option, value in settings)
    except (OSError, AttributeError):
        return False


def setup_training_process(threads: int = 0) -> None:
    if threads:
        torch.set_num_threads(threads)
    keep_freed_memory()
