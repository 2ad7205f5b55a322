"""Start a function in N processes on this machine (loopback, gloo), bounded in time."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from typing import Any

import pytest
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_world(fn: Callable[..., Any], world: int, *args: Any, timeout: float = 180) -> None:
    """`fn(rank, world, port, *args)` in `world` processes; fails the test with the first
    process's traceback, or when they have not all finished within `timeout` seconds."""
    ctx = mp.start_processes(
        fn, args=(world, free_port(), *args), nprocs=world, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"{world} processes did not finish within {timeout} s")
