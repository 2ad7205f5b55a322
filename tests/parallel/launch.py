"""Start a function in N processes on this machine (loopback, gloo), bounded in time."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from moekit.parallel.launch import free_port, run_processes

__all__ = ["free_port", "run_world"]


def run_world(fn: Callable[..., Any], world: int, *args: Any, timeout: float = 180) -> None:
    """`fn(rank, world, port, *args)` in `world` processes; fails the test with the first
    process's traceback, or when they have not all finished within `timeout` seconds."""
    try:
        run_processes(fn, world, *args, timeout=timeout)
    except TimeoutError as e:
        pytest.fail(str(e))
