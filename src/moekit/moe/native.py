"""Native CPU kernels for decoding with large float32 weights and int4 experts, compiled on
this machine the first time they are needed (csrc/native.cpp; AVX-512).

Reading a large weight is the whole cost of a decode-time product with it, and these kernels
stream each weight once, all threads over contiguous shares of its rows:
- `moekit_native::grouped_swiglu`: a few tokens through their chosen SwiGLU experts, in two
  parallel passes (each thread's share of the gate and up rows, then the activation on it;
  the down projection split by output row); `grouped_swiglu_int4` the same for int4 experts
  read from their packed bytes;
- `moekit_native::linear`: a few tokens through one dense weight.
Against the library's products (one per projection per chosen expert, what
`moekit.moe.decode_kernel.grouped_swiglu` falls back to) they read the weights faster and drop
the Python between the products (measured in docs/benchmarks.md, "A streaming kernel for large
float weights"). All are operators that a compiled graph calls as they are.

They are built with PyTorch's C++ extension builder (`torch.utils.cpp_extension.load`, which
needs a C++ compiler and ninja; `torch.compile` on CPU needs the compiler already) into
PyTorch's extension cache, once per machine: about 20 s the first time, a fraction of a
second after (a build killed halfway leaves a lock that is cleared after `STALE_LOCK_S`).
Where the build fails the compiler's error is logged once on the `moekit` logger and the
previous paths run (the library's products; for int4 experts the compiled kernel), with the
same results up to float rounding. Set `MOEKIT_NATIVE=0` to never build or use them.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time
from pathlib import Path

import torch
from torch import Tensor

from moekit.runtime import cpu_has_avx512

log = logging.getLogger("moekit")

SOURCE = Path(__file__).with_name("csrc") / "native.cpp"
NAME = "moekit_native"  # the extension's name: its folder in PyTorch's extension cache
# Decode steps: past this many tokens the library's matrix-matrix products are the better
# reader (they reuse each weight row across the tokens in registers and caches).
NATIVE_MAX_TOKENS = 8
FLAGS = ["-O3", "-mavx512f", "-mfma", "-fopenmp"]
STALE_LOCK_S = 600

_lock = threading.Lock()
_loaded: bool | None = None  # None: not tried yet


def enabled() -> bool:
    """Whether the native kernels may be used here: an AVX-512 CPU and `MOEKIT_NATIVE` not 0."""
    return os.environ.get("MOEKIT_NATIVE", "1") != "0" and cpu_has_avx512()


def load() -> bool:
    """Build (first time on this machine) and load the native kernels; False where they cannot
    be, with the reason logged once. Call it outside compiled code: `takes` only reads the
    outcome."""
    global _loaded
    if _loaded is not None:
        return _loaded
    with _lock:
        if _loaded is None:
            _loaded = _build()
    return _loaded


def _build() -> bool:
    if not enabled():
        return False
    try:
        from torch.utils.cpp_extension import load as build

        _find_ninja()
        _clear_stale_lock()
        log.info("moekit: loading the native decode kernels (built once per machine, ~20 s)")
        build(
            NAME,
            sources=[str(SOURCE)],
            extra_cflags=FLAGS,
            extra_ldflags=["-fopenmp"],
            is_python_module=False,
        )
        _register_fakes()
    except Exception as exc:  # a missing compiler or ninja, a failed build: fall back
        log.warning(
            "moekit: the native decode kernels could not be built (%s: %s); large float "
            "weights use the library's products and int4 experts the compiled kernel instead "
            "(set MOEKIT_NATIVE=0 to skip the try)",
            type(exc).__name__,
            _reason(str(exc)),
        )
        return False
    return True


def _reason(message: str) -> str:
    """The compiler's error lines of a failed build (ninja's own last line says only that a
    command failed), or the message's last line."""
    lines = [line.strip() for line in message.strip().splitlines() if line.strip()]
    errors = [line for line in lines if "error:" in line.lower() and "ninja:" not in line]
    return " | ".join(errors[:3]) if errors else (lines[-1] if lines else "no message")


_fakes_registered = False


def _register_fakes() -> None:
    """The operators' output shapes for compilers (once per process)."""
    global _fakes_registered
    if not _fakes_registered:
        torch.library.register_fake("moekit_native::grouped_swiglu")(_swiglu_shape)
        torch.library.register_fake("moekit_native::linear")(_linear_shape)
        torch.library.register_fake("moekit_native::grouped_swiglu_int4")(_swiglu_shape)
        _fakes_registered = True


def _clear_stale_lock() -> None:
    """PyTorch's builder waits, without a time limit, for the lock file of a build in
    progress; a build that was killed leaves that file behind. A lock older than
    `STALE_LOCK_S` cannot be a live build (one takes well under a minute): remove it."""
    from torch.utils.cpp_extension import _get_build_directory

    lock = Path(_get_build_directory(NAME, verbose=False)) / "lock"
    try:
        if time.time() - lock.stat().st_mtime > STALE_LOCK_S:
            lock.unlink()
            log.warning("moekit: removed a stale build lock left by a killed build: %s", lock)
    except FileNotFoundError:
        pass


def _find_ninja() -> None:
    """PyTorch's builder runs `ninja` from PATH: where only the pip package's copy is installed
    (a virtual environment run without activating it), put that copy on PATH."""
    if shutil.which("ninja") is None:
        try:
            import ninja
        except ImportError:
            return
        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")


def _swiglu_shape(x_TD: Tensor, *rest: object) -> Tensor:
    return x_TD.new_empty(x_TD.shape)


def _linear_shape(x_TD: Tensor, w_ND: Tensor) -> Tensor:
    return x_TD.new_empty(x_TD.shape[0], w_ND.shape[0])


def _fits(x_TD: Tensor, w: Tensor) -> bool:
    """A few float32 rows on the CPU, and a float32 weight whose last two dims are contiguous;
    nothing that autograd would follow (the operators have no backward)."""
    return (
        not (torch.is_grad_enabled() and (x_TD.requires_grad or w.requires_grad))
        and x_TD.dim() == 2
        and x_TD.shape[0] <= NATIVE_MAX_TOKENS
        and x_TD.device.type == "cpu"
        and x_TD.dtype == torch.float32
        and w.dtype == torch.float32
        and w.stride(-1) == 1
        and w.stride(-2) == w.shape[-1]
    )


def takes(x_TD: Tensor, gate_up_E2FD: Tensor, down_EDF: Tensor) -> bool:
    """Whether `grouped_swiglu` below computes these: the kernels loaded (`load`), float32 on
    the CPU, at most `NATIVE_MAX_TOKENS` tokens, each expert's weight contiguous."""
    return _loaded is True and _fits(x_TD, gate_up_E2FD) and _fits(x_TD, down_EDF)


def takes_int4(x_TD: Tensor, group: int, *parts: Tensor) -> bool:
    """Whether `grouped_swiglu_int4` below computes these int4 experts (`parts`: the gate's,
    the up's and the down's packed bytes, scales and minimums, as `moekit.quant.formats`
    stores them): conditions as `takes`, a group size (`group`, the smallest of the three)
    that is a multiple of 32, and gate and up in the same groups."""
    return (
        _loaded is True
        and group % 32 == 0
        and _fits(x_TD, x_TD)
        and all(p.dim() == 3 and p.stride(-1) == 1 and p.stride(-2) == p.shape[-1] for p in parts)
        and parts[1].shape == parts[4].shape  # gate and up in the same groups
    )


def takes_linear(x_TD: Tensor, w_ND: Tensor) -> bool:
    """Whether `linear` below computes `x_TD @ w_ND.T` (conditions as `takes`)."""
    return _loaded is True and w_ND.dim() == 2 and _fits(x_TD, w_ND)


def grouped_swiglu_int4(
    x_TD: Tensor, experts_TK: Tensor, weights_TK: Tensor, *parts: Tensor, scale_input: bool
) -> Tensor:
    """`grouped_swiglu` for int4 experts: `parts` are the gate's, the up's and the down's
    packed bytes, scales and minimums (nine tensors); only where `takes_int4` said so."""
    op = torch.ops.moekit_native.grouped_swiglu_int4
    return op(x_TD, experts_TK, weights_TK, *parts, scale_input)


def linear(x_TD: Tensor, w_ND: Tensor) -> Tensor:
    """`x_TD @ w_ND.T` (T, N) by the native kernel; only where `takes_linear` said so."""
    return torch.ops.moekit_native.linear(x_TD, w_ND)


def grouped_swiglu(
    x_TD: Tensor,
    experts_TK: Tensor,
    weights_TK: Tensor,
    gate_up_E2FD: Tensor,
    down_EDF: Tensor,
    scale_input: bool,
) -> Tensor:
    """Each token's chosen SwiGLU experts, weighted and summed (T, D), by the native kernel;
    only where `takes` said so. Arguments as `moekit.moe.decode_kernel.grouped_swiglu`."""
    op = torch.ops.moekit_native.grouped_swiglu
    return op(x_TD, experts_TK, weights_TK, gate_up_E2FD, down_EDF, scale_input)
