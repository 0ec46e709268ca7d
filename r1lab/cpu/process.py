"""Process set-up for training commands: CPU threads and the C library's malloc.

A small model's process keeps what it freed: glibc giving it back costs page faults on every step (a tenth of a small
GRPO step). A large model's gives blocks of 128 KB or more back, as held ones fragment (over 1 GB more at peak), and
the `r1lab` command restarts it under tcmalloc where installed (malloc.py).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
from pathlib import Path

import torch

from r1lab.cpu import decode_kernel, malloc
from r1lab.model.layers import FAST_PATHS
from r1lab.model.loading import pick_device

_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD, _M_MMAP_MAX = -1, -2, -3, -4  # glibc's malloc.h
LARGE_MODEL_BYTES = 256 << 20  # weights on disk from which a process gives large blocks back
KEEP_FREED = ((_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, 2**62), (_M_TOP_PAD, 64 << 20))
# glibc's own initial threshold, fixed: set, it stops glibc from raising it to the size of the last mapped block
# freed (up to 32 MB), past which blocks would be served from, and held by, the heap (at 1 MB: 0.26 GB more at peak)
RETURN_LARGE_BLOCKS = ((_M_MMAP_THRESHOLD, 128 << 10),)


def set_allocator(settings) -> bool:
    """Apply glibc mallopt settings; False where the C library is not glibc."""
    if not sys.platform.startswith("linux") or sys.maxsize <= 2**32:
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return all(libc.mallopt(option, value) == 1 for option, value in settings)
    except (OSError, AttributeError):
        return False


def weights_bytes(model: str | Path | None) -> int:
    """Bytes of a model directory's safetensors files (0 for no directory)."""
    path = Path(model) if model else None
    return sum(f.stat().st_size for f in path.glob("*.safetensors")) if path and path.is_dir() else 0


def setup_training_process(threads: int = 0, model: str | Path | None = None, device: str = "cpu") -> None:
    """CPU threads, the fast paths, and glibc's malloc policy for the size of the model in `model`."""
    if threads:
        torch.set_num_threads(threads)
    install_fast_paths()
    if not malloc.preloaded():
        set_allocator(RETURN_LARGE_BLOCKS if weights_bytes(model) >= LARGE_MODEL_BYTES else KEEP_FREED)


def relaunch_for_large_cpu_model(command: str, model: str | Path | None, device: str) -> None:
    """For a large model on the CPU, start this command again under tcmalloc (on a GPU glibc's policy is enough)."""
    if malloc.wanted(weights_bytes(model), model is not None and pick_device(device).type == "cpu", LARGE_MODEL_BYTES):
        malloc.relaunch_with_preferred_malloc(command)


def install_fast_paths() -> None:
    """The model's CPU fast paths (model/layers.py's FAST_PATHS): the decode kernel's products over a few rows."""
    FAST_PATHS.few_rows_linear = decode_kernel.few_rows_linear
