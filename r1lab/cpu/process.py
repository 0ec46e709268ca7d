"""Process set-up for training commands: CPU threads and the C library's malloc.

glibc returns freed memory to the operating system past a trim threshold, and serves large blocks with fresh
mmaps, so a CPU training step that frees and re-allocates the same tens of megabytes each step pays for page faults
on memory it just gave back: a tenth or more of a GRPO step of a small model, and most of its run-to-run variance.
So a small model's process keeps what it freed. A large model's is the other way round: its step takes seconds,
page faults are a small share of it, and memory kept in the heap fragments: at the Qwen2.5-0.5B shape, holding
freed blocks raised the peak by more than 1 GB. So blocks of 128 KB or more are mapped apart and given back; and the
`r1lab` command restarts such a process under tcmalloc where it is installed (r1lab/cpu/malloc.py), which reuses
freed pages without the peak rising.
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
    """CPU threads, the fast paths, and glibc's malloc policy for the size of the model about to be loaded from
    `model` (none where tcmalloc or jemalloc serves this process)."""
    if threads:
        torch.set_num_threads(threads)
    install_fast_paths()
    if not malloc.preloaded():
        set_allocator(RETURN_LARGE_BLOCKS if weights_bytes(model) >= LARGE_MODEL_BYTES else KEEP_FREED)


def relaunch_for_large_cpu_model(command: str, model: str | Path | None, device: str) -> None:
    """For a large model on the CPU (`device` "auto": CUDA where there is one), start this command again under
    tcmalloc (r1lab/cpu/malloc.py). On a GPU, the host's large blocks are the weights on their way to the device:
    glibc's policy is enough."""
    if malloc.wanted(weights_bytes(model), model is not None and pick_device(device).type == "cpu", LARGE_MODEL_BYTES):
        malloc.relaunch_with_preferred_malloc(command)


def install_fast_paths() -> None:
    """The model's CPU fast paths (model/layers.py's FAST_PATHS, the one door through which cpu/ reaches the model):
    the decode kernel's products over a few rows."""
    FAST_PATHS.few_rows_linear = decode_kernel.few_rows_linear
