"""The small native libraries r1lab compiles on first use (the CPU decode kernel, the CPU allocator): the machine's
compiler, a cache directory keyed by the source, the compiler, its flags and the CPU, and an atomic build.

A library is built for this CPU (-march=native) and, for C++, against the torch it runs in, so a cache shared by
several machines or environments holds one build per combination. The cache is R1LAB_KERNEL_CACHE, else
$XDG_CACHE_HOME/r1lab/kernels, else ~/.cache/r1lab/kernels.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Sequence

COMPILERS = {"CC": ("cc", "gcc", "clang"), "CXX": ("c++", "g++", "clang++")}


class BuildError(RuntimeError):
    """No compiler, or the compiler refused the source: the caller falls back to torch's own code."""


def build(source: Path, language: str, flags: Sequence[str], key_extra: str = "") -> Path:
    """The compiled shared library of source: from the cache, or compiled into it now. language: "CC" or "CXX"."""
    compiler = compiler_command(language)
    try:
        version = subprocess.run([*compiler, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError) as e:
        raise BuildError(f"{' '.join(compiler)} --version failed: {e}") from e
    key = hashlib.sha256("\0".join([source.read_text(), " ".join(compiler), version, " ".join(flags),
                                    cpu_identity(), key_extra]).encode()).hexdigest()[:16]
    target = cache_dir() / f"{source.stem}-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, partial = tempfile.mkstemp(dir=target.parent, suffix=".so.partial")  # other processes may build at once
    os.close(fd)
    try:
        done = subprocess.run([*compiler, str(source), *flags, "-o", partial], capture_output=True, text=True,
                              timeout=600)
        if done.returncode != 0:
            raise BuildError(f"{' '.join(compiler)} failed on {source.name}: {done.stderr.strip()[-800:]}")
        os.replace(partial, target)
    finally:
        Path(partial).unlink(missing_ok=True)
    return target


def compiler_command(language: str) -> list[str]:
    """The compiler named by $CC / $CXX, else the first of the usual ones on PATH."""
    named = shlex.split(os.environ.get(language, ""))
    found = named or [next((c for c in COMPILERS[language] if shutil.which(c)), "")]
    if not found[0] or not shutil.which(found[0]):
        raise BuildError(f"no {'C' if language == 'CC' else 'C++'} compiler found (set {language}, or install gcc)")
    return found


def cache_dir() -> Path:
    if os.environ.get("R1LAB_KERNEL_CACHE"):
        return Path(os.environ["R1LAB_KERNEL_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "r1lab" / "kernels"


def cpu_identity() -> str:
    """What -march=native builds for: the CPU's model and instruction-set flags."""
    try:
        info = Path("/proc/cpuinfo").read_text().split("\n\n")[0]
        return "\n".join(line for line in info.splitlines() if line.startswith(("model name", "flags", "Features")))
    except OSError:
        return f"{platform.machine()} {platform.processor()}"


def openmp_runtimes() -> set[str]:
    """The OpenMP runtime libraries mapped into this process (Linux; elsewhere none is seen)."""
    if not sys.platform.startswith("linux"):
        return set()
    names = ("libgomp", "libiomp", "libomp")
    with open("/proc/self/maps") as maps:
        paths = {line.split()[-1] for line in maps if "/" in line}
    return {os.path.realpath(p) for p in paths if os.path.basename(p).startswith(names)}


def switched_off(variable: str) -> bool:
    return os.environ.get(variable, "1").strip().lower() in ("0", "false", "no", "off")
