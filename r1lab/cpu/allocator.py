"""torch's CPU allocator for a large model's process: freed blocks are reused by requests of the same size, under a
cap of the highest live total seen, and other requests are assembled from the pages of freed blocks, so the page
faults of fresh memory go without the peak rising (cpu_allocator.cpp).

Installed by r1lab/cpu/process.py for a large model (the policy that otherwise maps every block of 128 KB or more apart
and gives it back at once). Compiled against the running torch on first use by torch.utils.cpp_extension (a few seconds;
cached). Without a C++ compiler, or with R1LAB_CPU_ALLOCATOR=0, torch's own allocator stays, with a warning in the first
case.
"""

from __future__ import annotations

import ctypes
import threading
import warnings
from pathlib import Path

from r1lab.cpu.decode_kernel import switched_off

SOURCE = Path(__file__).with_name("allocator.cpp")
LARGE = 128 << 10  # blocks from this size are kept for reuse; smaller ones stay in glibc's heap, as before
_STAT_NAMES = ("live", "kept", "peak_live", "reused", "assembled", "mapped", "moved_bytes", "fresh_bytes",
               "failed_moves", "drops")
_lock = threading.Lock()
_loaded: dict[str, object] = {}  # "library", or None once it could not be had


def install() -> bool:
    """Make it torch's CPU allocator for every tensor allocated from now on; False where it cannot be had."""
    library = _library()
    if library is None:
        return False
    library.r1lab_install(LARGE)
    _loaded["installed"] = True
    return True


def uninstall() -> None:
    """Allocate with torch's own allocator from now on (blocks already handed out still come back here)."""
    library = _library(build=False)
    if library is not None:
        library.r1lab_uninstall()
    _loaded["installed"] = False


def installed() -> bool:
    """Whether tensors allocated now come from this allocator."""
    return bool(_loaded.get("installed"))


def drop_kept() -> None:
    """Give every kept block back to the system."""
    library = _library(build=False)
    if library is not None:
        library.r1lab_drop_kept()


def stats() -> dict[str, int]:
    """Bytes live and kept and the highest live total; blocks reused whole, assembled from kept pages, and mapped
    fresh; bytes moved from kept blocks and fresh bytes; moves the kernel refused; times every kept block was unmapped
    to bound the process's mappings (zeros before install)."""
    library = _library(build=False)
    out = (ctypes.c_uint64 * len(_STAT_NAMES))()
    if library is not None:
        library.r1lab_stats(out)
    return dict(zip(_STAT_NAMES, map(int, out)))


def _library(build: bool = True):
    with _lock:
        if "library" not in _loaded and build:
            _loaded["library"] = None if switched_off("R1LAB_CPU_ALLOCATOR") else _load()
        return _loaded.get("library")


def _load():
    from torch.utils import cpp_extension  # imports setuptools: only where the allocator is built or loaded

    try:  # cpp_extension compiles against the running torch (headers, ABI flag, c10) and caches per source
        path = cpp_extension.load(name="r1lab_cpu_allocator", sources=[str(SOURCE)], extra_cflags=["-O2"],
                                  is_python_module=False, verbose=False)
        library = ctypes.CDLL(str(path))
    except Exception as e:  # noqa: BLE001 - no compiler, no ninja, a compile error: torch's allocator stays
        reason = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        warnings.warn(f"r1lab: the CPU allocator is not available ({reason}); torch's own is used, and a large "
                      f"model's steps fault in fresh memory", RuntimeWarning, stacklevel=4)
        return None
    library.r1lab_install.argtypes, library.r1lab_install.restype = [ctypes.c_size_t], ctypes.c_int
    library.r1lab_stats.argtypes = [ctypes.POINTER(ctypes.c_uint64)]
    return library
