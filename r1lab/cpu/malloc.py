"""tcmalloc for a large model on the CPU: the `r1lab` command starts itself again (exec) with it preloaded.

At the Qwen2.5-0.5B shape glibc's malloc either returns freed gigabytes and faults them in again (13% of a step) or
fragments (over 1 GB more at peak); tcmalloc does neither, jemalloc comes second (docs/performance.md).
"""

from __future__ import annotations

import ctypes.util
import os
import sys
import warnings
from pathlib import Path

# (library name for ctypes.util.find_library, the Debian package that has it, its settings variable and settings)
CANDIDATES = (
    ("tcmalloc_minimal", "libtcmalloc-minimal4", None, None),
    # pages of freed blocks returned 10 s after their last use (not at once), large blocks mapped apart, a background
    # thread doing the returning off the training thread
    ("jemalloc", "libjemalloc2", "MALLOC_CONF",
     "background_thread:true,oversize_threshold:0,dirty_decay_ms:10000,muzzy_decay_ms:0"),
)
RELAUNCHED = "R1LAB_MALLOC_RELAUNCHED"  # set in the relaunched process: never relaunch twice
SWITCH = "R1LAB_CPU_ALLOCATOR"  # 0: keep glibc's malloc


def preloaded() -> str | None:
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return None
    return next((name for name, *_ in CANDIDATES if f"lib{name}" in maps), None)


def find_candidate() -> tuple[str, str, str | None, str | None, str] | None:
    """The first candidate installed: (name, package, settings variable, settings, library file)."""
    for name, package, variable, settings in CANDIDATES:
        if found := ctypes.util.find_library(name):
            return name, package, variable, settings, found
    return None


def preload_env(env: dict) -> dict | None:
    """env with the preferred malloc preloaded (the user's LD_PRELOAD and settings kept), or None."""
    candidate = find_candidate()
    if candidate is None:
        return None
    name, _, variable, settings, library = candidate
    env = dict(env)
    env["LD_PRELOAD"] = " ".join(filter(None, (library, env.get("LD_PRELOAD"))))
    if variable and settings:
        env.setdefault(variable, settings)  # a user's MALLOC_CONF wins
    env[RELAUNCHED] = name
    return env


def wanted(weights_bytes: int, on_cpu: bool, threshold: int) -> bool:
    """A large model on the CPU, the swap not switched off, and not done already."""
    return on_cpu and weights_bytes >= threshold and not switched_off(SWITCH) and sys.platform.startswith("linux")


def switched_off(variable: str) -> bool:
    return os.environ.get(variable, "1").strip().lower() in ("0", "false", "no", "off")


def relaunch_with_preferred_malloc(command: str) -> None:
    """Replace this process with the same command line under tcmalloc (or jemalloc), where it is not yet."""
    if preloaded():
        return
    if os.environ.get(RELAUNCHED):  # relaunched, yet not mapped: the loader refused it (it said why on stderr)
        warnings.warn(f"r1lab {command}: {os.environ[RELAUNCHED]} was preloaded but is not in use; glibc's malloc "
                      f"stays", RuntimeWarning, stacklevel=2)
        return
    env = preload_env(os.environ)
    if env is None:
        packages = " or ".join(package for _, package, *_ in CANDIDATES)
        warnings.warn(f"r1lab {command}: neither tcmalloc nor jemalloc is installed, so a large model's CPU steps "
                      f"run on glibc's malloc (13-28% slower at the Qwen2.5-0.5B shape); install {packages} "
                      f"(apt-get install libtcmalloc-minimal4), or set {SWITCH}=0 to silence this", RuntimeWarning,
                      stacklevel=2)
        return
    print(f"r1lab {command}: a large model on the CPU: restarting with {env[RELAUNCHED]} "
          f"(LD_PRELOAD={env['LD_PRELOAD']}; {SWITCH}=0 keeps glibc's malloc)", file=sys.stderr, flush=True)
    sys.stdout.flush()  # what is buffered would be lost with the process image
    os.execve(sys.executable, sys.orig_argv, env)
