"""A decode step's matrix products on a CPU, x @ W.T + b for a few rows of x: a small C++ kernel (decode_kernel.cpp)
that streams the weights from memory (MKL's sgemm is built to reuse them from cache), else torch's products.

The kernel is compiled on first use by torch.utils.cpp_extension for this CPU (whose digest is in the library's
name); without a compiler or ninja (with a warning), or with R1LAB_DECODE_KERNEL=0, decode takes torch's products.
A built library runs inside r1lab, so the build cache must be one nobody else can write to: torch's where safe, else
a private one. A cached library is read with nm before it is loaded: a corrupt one is rebuilt once.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import stat
import subprocess
import sys
import threading
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

from r1lab.cpu.malloc import switched_off

SOURCE = Path(__file__).with_name("decode_kernel.cpp")
FLAGS = ["-O3", "-march=native", "-ffp-contract=fast", "-fopenmp"]
SLICE_ROWS = 512  # rows of a weight slice in torch's path: 256-768 measured alike
SLICED_MIN = 4 << 20  # parameters from which slices pay: below, a decode step is bound by per-call overheads
_ARGTYPES = [ctypes.c_void_p] * 4 + [ctypes.c_long] * 3 + [ctypes.c_int]
SYMBOLS = ("few_rows_linear",)  # what the library must define
WRITABLE_BY_OTHERS = stat.S_IWGRP | stat.S_IWOTH
_lock = threading.Lock()
_loaded: dict[str, object] = {}  # "kernel": the C function, or None once it could not be had


def few_rows_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x @ W.T + b for a few rows of x on a CPU: the kernel, else torch's products as MKL streams them fastest."""
    rows, out = x.numel() // x.shape[-1], weight.shape[0]
    flat = x.reshape(rows, x.shape[-1])
    y = linear(flat, weight, bias)
    if y is None and (out <= 4 * SLICE_ROWS or weight.numel() < SLICED_MIN):
        y = (weight @ flat.t()).t() if bias is None else torch.addmm(bias[:, None], weight, flat.t()).t()
    elif y is None:
        y = torch.cat([F.linear(flat, weight[i : i + SLICE_ROWS], None if bias is None else bias[i : i + SLICE_ROWS])
                       for i in range(0, out, SLICE_ROWS)], dim=1)
    return y.reshape(*x.shape[:-1], out)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor | None:
    """x @ weight.T + bias by the kernel, or None where it does not apply."""
    kernel = _kernel() if _applies(x, weight, bias) else None
    if kernel is None:
        return None
    x = x.contiguous()
    rows, n_out = x.shape[0], weight.shape[0]
    y = torch.empty(rows, n_out, dtype=torch.float32)
    kernel(x.data_ptr(), weight.data_ptr(), None if bias is None else bias.data_ptr(), y.data_ptr(),
           rows, n_out, x.shape[1], torch.get_num_threads())
    return y


def _applies(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    tensors = (x, weight) if bias is None else (x, weight, bias)
    if any(type(t) not in (torch.Tensor, torch.nn.Parameter) for t in tensors):  # DTensor, subclasses
        return False
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return False  # the C call is invisible to autograd
    return (x.dim() == 2 and x.shape[1] == weight.shape[1] and weight.dim() == 2
            and all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors)
            and weight.is_contiguous() and (bias is None or bias.is_contiguous()))


def available() -> bool:
    """Whether decode uses the kernel (compiling it now if needed)."""
    return _kernel() is not None


def _kernel():
    if "kernel" in _loaded:  # every decode product asks: no lock once it is settled
        return _loaded["kernel"]
    with _lock:
        if "kernel" not in _loaded:
            _loaded["kernel"] = None if switched_off("R1LAB_DECODE_KERNEL") else _load()
        return _loaded["kernel"]


def _load():
    from torch.utils import cpp_extension  # imports setuptools: only where the kernel is built or loaded

    name = f"r1lab_decode_{cpu_tag()}"
    try:
        path = _checked_build(cpp_extension, name, build_directory(name))
        library = ctypes.CDLL(str(path))
        kernel = library.few_rows_linear
    except Exception as e:  # noqa: BLE001 - no compiler, no ninja, a compile error, an unsafe cache: torch's path
        reason = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        warnings.warn(f"r1lab: the CPU decode kernel is not available ({reason}); decode uses torch's matrix "
                      f"products, which are slower", RuntimeWarning, stacklevel=4)
        return None
    if len(openmp_runtimes()) > 1:
        warnings.warn("r1lab: the CPU decode kernel would run a second OpenMP runtime beside torch's; decode uses "
                      "torch's matrix products", RuntimeWarning, stacklevel=4)
        return None
    kernel.argtypes, kernel.restype = _ARGTYPES, None
    return kernel


def _checked_build(cpp_extension, name: str, directory: Path) -> Path:
    """The kernel's library in directory, built where needed; a cached one that fails the check is rebuilt once."""
    cached = directory / f"{name}.so"
    if cached.exists() and (problem := library_problem(cached)) is not None:
        warnings.warn(f"r1lab: the cached CPU decode kernel {cached} {problem}; rebuilding it", RuntimeWarning,
                      stacklevel=5)
        shutil.rmtree(directory)
        directory.mkdir(mode=0o700)
    path = Path(cpp_extension.load(name=name, sources=[str(SOURCE)], extra_cflags=FLAGS, extra_ldflags=["-fopenmp"],
                                   build_directory=str(directory), is_python_module=False, verbose=False))
    _withhold_write_from_others(directory)
    if (problem := library_problem(path)) is not None:
        raise RuntimeError(f"{path} {problem} after it was built")
    return path


def library_problem(path: Path) -> str | None:
    """What is wrong with the library at path, or None when it defines SYMBOLS: read with nm, as loading runs it."""
    nm = shutil.which("nm")
    if nm is None:
        return "cannot be checked: nm is missing (install binutils, which the C++ compiler comes with)"
    flags = ["-D", "--defined-only"] if sys.platform.startswith("linux") else ["-g", "-U"]
    try:
        listed = subprocess.run([nm, *flags, str(path)], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as e:
        return f"cannot be read by nm ({e})"
    if listed.returncode:
        said = (listed.stderr.strip().splitlines() or ["nm failed"])[-1].rsplit(": ", 1)[-1]  # after "nm: PATH: "
        return f"is not a readable shared library ({said[:200]})"
    defined = {line.split()[-1].removeprefix("_" if sys.platform == "darwin" else "")
               for line in listed.stdout.splitlines() if line.split()}
    missing = [symbol for symbol in SYMBOLS if symbol not in defined]
    return f"does not define {', '.join(missing)}" if missing else None


def build_directory(name: str) -> Path:
    """torch's build cache where no one else can write to it, else r1lab's private one, else RuntimeError."""
    from torch.utils import cpp_extension

    shared_root = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or cpp_extension.get_default_build_root())
    directory, problem = _prepared(shared_root / name)
    if problem is None:
        return directory
    private_root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "r1lab" / "torch_extensions"
    private, private_problem = _prepared(private_root / name)
    if private_problem is not None:
        raise RuntimeError(f"no safe build cache: {problem}; {private_problem}")
    warnings.warn(f"r1lab: {problem}, so another user could plant a library there; the CPU decode kernel is built in "
                  f"{private} instead", RuntimeWarning, stacklevel=4)
    return private


def _prepared(directory: Path) -> tuple[Path, str | None]:
    """directory, created for this user if missing, and why another user could plant a library in it (or None)."""
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        directory = directory.resolve()
        return directory, planting_risk(directory)
    except OSError as e:
        return directory, f"the build cache {directory} cannot be used ({e.strerror or e})"


def planting_risk(directory: Path) -> str | None:
    """Why another user could put a library into directory, or None. It and its entries must be the user's and
    writable by no one else; each directory above it the user's or root's, and sticky where others may write."""
    uid = os.getuid()
    for path in [directory, *directory.iterdir()]:
        info = path.lstat()  # a link's own mode is rwx for all: refused, as the cache holds none of its own
        if info.st_uid != uid:
            return f"the build cache entry {path} belongs to another user (uid {info.st_uid})"
        if info.st_mode & WRITABLE_BY_OTHERS:
            return f"the build cache entry {path} is writable by other users (mode {stat.S_IMODE(info.st_mode):o})"
    for parent in directory.parents:
        info = parent.stat()
        if info.st_uid not in (uid, 0):
            return f"the build cache's parent {parent} belongs to another user (uid {info.st_uid})"
        if info.st_mode & WRITABLE_BY_OTHERS and not info.st_mode & stat.S_ISVTX:
            return f"the build cache's parent {parent} is writable by other users (mode {stat.S_IMODE(info.st_mode):o})"
    return None


def _withhold_write_from_others(directory: Path) -> None:
    """What the build wrote under a umask such as 002, made writable by this user alone."""
    for path in [directory, *directory.iterdir()]:
        info = path.lstat()
        if info.st_mode & WRITABLE_BY_OTHERS and not stat.S_ISLNK(info.st_mode):
            path.chmod(stat.S_IMODE(info.st_mode) & ~WRITABLE_BY_OTHERS)


def cpu_tag() -> str:
    """A short digest of what -march=native builds for: the CPU's model and instruction-set flags."""
    try:
        info = Path("/proc/cpuinfo").read_text().split("\n\n")[0]
        identity = "\n".join(line for line in info.splitlines() if line.startswith(("model name", "flags", "Features")))
    except OSError:
        identity = f"{platform.machine()} {platform.processor()}"
    return hashlib.sha256(identity.encode()).hexdigest()[:12]


def openmp_runtimes() -> set[str]:
    """The OpenMP runtime libraries mapped into this process (Linux only)."""
    if not sys.platform.startswith("linux"):
        return set()
    names = ("libgomp", "libiomp", "libomp")
    with open("/proc/self/maps") as maps:
        paths = {line.split()[-1] for line in maps if "/" in line}
    return {os.path.realpath(p) for p in paths if os.path.basename(p).startswith(names)}
