"""Small functions compiled once per static shape, for the decode path's hot loops.

A decode step calls a few functions many times with the same shapes (one token through its
chosen experts, one row through an int4 weight). `StaticKernels` compiles such a function
with inductor (generated C++ on the CPU) once per key, traced on fake tensors and without
dynamo: dynamo's per-call guard checks would cost several times these calls' own work. The
caller's key must pin every shape, stride and dtype the compiled code assumes (it checks
them again at each call). Compiled code is cached on disk by inductor, so a later process
loads it instead of compiling again.

`run` returns None, and the caller takes its eager path, when:
- compiling that key failed (no C++ compiler, an unsupported platform): logged once on the
  `moekit` logger, with the reason, and not tried again;
- a Python dispatch mode is active (an operator counter, a fake-tensor trace): compiled code
  cannot run under it, and the eager operators are what such a mode wants to see;
- torch is compiling the caller (inside a compiled decode step): the caller traces its math.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.utils._python_dispatch import _get_current_dispatch_mode

log = logging.getLogger("moekit")

Kernel = Callable[..., Tensor]


def layout(*tensors: Tensor) -> tuple[Any, ...]:
    """What a key must pin of `tensors`: shape, strides and dtype of each."""
    return tuple((tuple(t.shape), t.stride(), t.dtype) for t in tensors)


def compile_static(fn: Kernel, example: tuple[Any, ...], options: dict[str, Any]) -> Kernel:
    """`fn` compiled by inductor for exactly the shapes, strides and dtypes of `example`.
    Traced on fake tensors: tracing on real ones would run `fn` once (and allocate what it
    allocates)."""
    from torch.fx.experimental.proxy_tensor import make_fx

    graph = make_fx(fn, tracing_mode="fake")(*example)
    compiled: Kernel = torch._inductor.compile(graph, list(example), options=options)
    return compiled


def unavailable() -> bool:
    """Whether compiled kernels cannot run here and now (a dispatch mode, or inside a
    compiled caller)."""
    return _get_current_dispatch_mode() is not None or torch.compiler.is_compiling()


class StaticKernels:
    """`fn` compiled once per key (see the module docstring); `what` names it in the log."""

    def __init__(self, fn: Kernel, what: str, options: dict[str, Any] | None = None) -> None:
        self.fn, self.what, self.options = fn, what, dict(options or {})
        self.compiled: dict[tuple, Kernel] = {}
        self.failed: dict[tuple, str] = {}
        self._lock = threading.Lock()

    def run(self, key: tuple, *args: Any) -> Tensor | None:
        """`fn(*args)` through the kernel compiled for `key`; None where the caller should
        take its eager path (see the module docstring)."""
        if key in self.failed or unavailable():
            return None
        try:
            with self._lock:
                if key not in self.compiled:
                    self.compiled[key] = compile_static(self.fn, args, self.options)
            return self.compiled[key](*args)
        except Exception as exc:  # compilation failures come as many exception types
            self.failed[key] = f"{type(exc).__name__}: {exc}".splitlines()[0]
            log.warning(
                "compiling %s failed (%s); using the eager path for it",
                self.what,
                self.failed[key],
            )
            return None
