"""A decode step's matrix products on a CPU, x @ W.T + b for a few rows of x: a small C kernel (decode_matmul.c).

Decoding reads every weight once per step for a handful of rows, so its speed is the rate at which the weights
stream from memory. At the Qwen2.5-0.5B shape on 2 AVX-512 cores, MKL's sgemm read them at 11-16 GB/s where a plain
sum reads 24 (r1lab/model/transformer.py's _few_rows_linear, which picks MKL's best orientation, at 13.5); the kernel reads them
at 20-25, and a rollout of 8 x 32 tokens runs in 3.9-4.8 instead of 4.9-6.2 s (bench/README.md).

The kernel is compiled with the machine's C compiler on first use (about a second; r1lab/cpu/build.py caches it per
source, compiler and CPU, since it is built for this CPU's vector instructions). Without a compiler, or with
R1LAB_DECODE_KERNEL=0, decode takes torch's own products, with a warning saying why in the first case.
"""

from __future__ import annotations

import ctypes
import subprocess
import threading
import warnings
from pathlib import Path

import torch

from r1lab.cpu import build as native

SOURCE = Path(__file__).with_name("decode_kernel.c")
FLAGS = ("-O3", "-march=native", "-ffp-contract=fast", "-fopenmp", "-shared", "-fPIC")
_ARGTYPES = [ctypes.c_void_p] * 4 + [ctypes.c_long] * 3 + [ctypes.c_int]
_lock = threading.Lock()
_loaded: dict[str, object] = {}  # "kernel": the C function, or None once it could not be had


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor | None:
    """x (rows, K) @ weight.T + bias as a new (rows, N) tensor, or None where the kernel does not apply: not a
    contiguous float32 CPU weight, a product autograd must see, or no kernel on this machine."""
    if not _applies(x, weight, bias):
        return None
    kernel = _kernel()
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
    """Whether decode on this machine uses the kernel (compiling it now if it is not yet)."""
    return _kernel() is not None


def _kernel():
    if "kernel" in _loaded:  # every decode product asks: no lock once it is settled
        return _loaded["kernel"]
    with _lock:
        if "kernel" not in _loaded:
            _loaded["kernel"] = None if native.switched_off("R1LAB_DECODE_KERNEL") else _load()
        return _loaded["kernel"]


def _load():
    try:
        library = ctypes.CDLL(str(native.build(SOURCE, "CC", FLAGS)))
    except (OSError, native.BuildError, subprocess.SubprocessError) as e:
        warnings.warn(f"r1lab: the CPU decode kernel is not available ({e}); decode uses torch's matrix products, "
                      f"which are slower", RuntimeWarning, stacklevel=4)
        return None
    if len(native.openmp_runtimes()) > 1:
        warnings.warn("r1lab: the CPU decode kernel would run a second OpenMP runtime beside torch's; decode uses "
                      "torch's matrix products", RuntimeWarning, stacklevel=4)
        return None
    kernel = library.few_rows_linear
    kernel.argtypes, kernel.restype = _ARGTYPES, None
    return kernel
