"""Process-level runtime settings: where models run (`resolve_device`, the one device policy)
and fast CPU execution (`tune_cpu_allocator`; `cpu_has_avx512`, which the kernel choices that
differ between CPUs read).

PyTorch's CPU allocator hands large tensors straight to glibc, which serves blocks above its
mmap threshold with fresh `mmap` pages and unmaps them on free. Every forward pass then pays a
page fault per 4 KiB of each large activation: on a 2-core machine that made a 64 MiB row
gather 7x slower than the copy itself. `tune_cpu_allocator()` tells glibc to serve large
blocks from its heap and to keep freed memory for reuse (the effect of running under jemalloc
or tcmalloc, which is the usual advice for PyTorch on CPU). The moekit command-line tools call
it at start; library users may call it themselves. The cost: the process keeps its peak heap
size instead of returning memory to the OS between steps. Set `MOEKIT_CPU_ALLOCATOR=system`
to leave glibc's defaults alone.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_tuned: bool | None = None


def tune_cpu_allocator() -> bool:
    """Make glibc reuse freed large blocks instead of unmapping them. Returns True if applied.

    A no-op (False) off glibc, or when `MOEKIT_CPU_ALLOCATOR=system` is set. Idempotent.
    """
    global _tuned
    if _tuned is not None:
        return _tuned
    _tuned = False
    if os.environ.get("MOEKIT_CPU_ALLOCATOR", "").lower() == "system":
        return False
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        libc.gnu_get_libc_version  # noqa: B018  (only glibc has it, and mallopt's meaning)
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        ok = libc.mallopt(_M_MMAP_MAX, 0) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1) == 1
    except (OSError, AttributeError):
        return False
    _tuned = bool(ok)
    return _tuned


DEVICES_HELP = "auto (CUDA when present, else the CPU), cpu, cuda or cuda:N"


def resolve_device(name: str | torch.device | None = "auto") -> torch.device:
    """moekit's one device policy: "auto" (or None) is the first CUDA device when one is
    present, else the CPU; anything else names a device torch knows ("cpu", "cuda",
    "cuda:1"). A CUDA device asked for on a machine without one is a ValueError that says so."""
    import torch

    if name is None or name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device={name!r} is invalid: use {DEVICES_HELP}") from e
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device={name!r}: CUDA is not available on this machine")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(
                f"device={name!r}: this machine has {torch.cuda.device_count()} CUDA device(s)"
            )
    return device


@functools.cache
def cpu_has_avx512() -> bool:
    """Whether PyTorch runs this CPU's vectorised kernels at AVX-512 (the CPUs on which the
    library's matrix products and PyTorch's bfloat16 weight-only kernels were measured fastest;
    see moekit.moe.decode_kernel and moekit.quant.weight)."""
    import torch

    return torch.backends.cpu.get_cpu_capability().startswith("AVX512")
