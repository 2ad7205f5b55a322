"""Starting a function in several processes of this machine (spawned, joined through the
loopback interface), bounded in time: what benchmarks and tests use where `torchrun` would
be the user's tool."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from typing import Any


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for the processes' rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_processes(fn: Callable[..., Any], nprocs: int, *args: Any, timeout: float = 1800) -> None:
    """`fn(rank, nprocs, port, *args)` in `nprocs` spawned processes (`fn` must be importable
    by name; `port` a free one for their rendezvous). Raises the first process's error (with
    its traceback), or TimeoutError, after stopping the others, when they have not all
    finished within `timeout` seconds."""
    import torch.multiprocessing as mp

    ctx = mp.start_processes(
        fn, args=(nprocs, free_port(), *args), nprocs=nprocs, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            raise TimeoutError(f"{nprocs} processes did not finish within {timeout:.0f} s")
