"""Hostile clients for `moekit bench serve`, run beside the well-formed ones to show that they
cannot hurt them: a slowloris that trickles a request's headers one byte at a time and never
finishes them, and a client that sends oversized requests (a body over the server's limit, and
a prompt far beyond the model's context). Also the process's memory while they run.

Every client talks to a server on loopback only.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

SLOWLORIS_CONNECTIONS = 8
TRICKLE_INTERVAL_S = 0.5  # one more header byte this often: slower than any real client
OVERSIZED_BODY_BYTES = 4 << 20  # over the server's 1 MiB body limit
OVERSIZED_PROMPT_CHARS = 600_000  # under the body limit, far over any context


@dataclass(frozen=True)
class SlowLoris:
    """What the slowloris connections met: how many were opened, how many the server cut
    before the benchmark ended, and the longest any stayed open (seconds)."""

    connections: int
    cut_by_server: int
    longest_open_s: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "connections": self.connections,
            "cut_by_server": self.cut_by_server,
            "longest_open_s": self.longest_open_s,
        }


@dataclass(frozen=True)
class Oversized:
    """The oversized requests sent and the answers they got, by HTTP status ("error" when the
    connection failed without an answer)."""

    requests: int
    statuses: dict[str, int] = field(default_factory=dict)

    @property
    def refused(self) -> int:
        """Requests refused as the client's fault (a 4xx answer)."""
        return sum(n for s, n in self.statuses.items() if s.startswith("4"))

    def to_dict(self) -> dict[str, Any]:
        return {"requests": self.requests, "refused": self.refused, "statuses": self.statuses}


@dataclass(frozen=True)
class MemoryUse:
    """The process's resident memory before the load and its peak while the load ran."""

    before_bytes: int
    peak_bytes: int

    @property
    def growth_bytes(self) -> int:
        return self.peak_bytes - self.before_bytes

    def to_dict(self) -> dict[str, Any]:
        return {
            "before_bytes": self.before_bytes,
            "peak_bytes": self.peak_bytes,
            "growth_bytes": self.growth_bytes,
        }


_seen = [0]  # the largest `resident_bytes` reading so far


def resident_bytes() -> int:
    """This process's resident memory now (Linux /proc; elsewhere its peak so far)."""
    try:
        with open("/proc/self/statm") as f:
            now = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return peak_resident_bytes()
    _seen[0] = max(_seen[0], now)
    return now


def peak_resident_bytes() -> int:
    """This process's peak resident memory since it started (loading included): the kernel's
    high-water mark, and never below a reading `resident_bytes` gave (the kernel updates the
    two from per-thread counters at different times, so the mark can lag a reading by a few
    pages)."""
    import resource

    mark = int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # KiB on Linux
    return max(mark, _seen[0])


@contextlib.contextmanager
def peak_memory(interval_s: float = 0.05) -> Iterator[list[MemoryUse]]:
    """Sample resident memory while inside; the yielded list receives the `MemoryUse` on exit."""
    before = resident_bytes()
    peak = [before]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(interval_s):
            peak[0] = max(peak[0], resident_bytes())

    sampler = threading.Thread(target=sample, name="moekit-bench-memory", daemon=True)
    sampler.start()
    out: list[MemoryUse] = []
    try:
        yield out
    finally:
        done.set()
        sampler.join()
        out.append(MemoryUse(before, max(peak[0], resident_bytes())))


def slowloris(host: str, port: int, seconds: float) -> SlowLoris:
    """Open `SLOWLORIS_CONNECTIONS` connections that start a request and then send one more
    header byte every `TRICKLE_INTERVAL_S`, never ending the headers, for `seconds`."""
    opened: list[float] = []
    cut: list[bool] = []
    lock = threading.Lock()

    def one() -> None:
        start = time.monotonic()
        closed = False
        try:
            with socket.create_connection((host, port), timeout=5) as s:
                s.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: {host}:{port}\r\nX-a: ".encode())
                while time.monotonic() - start < seconds:
                    time.sleep(TRICKLE_INTERVAL_S)
                    s.sendall(b"a")
                    if _closed_by_peer(s):
                        closed = True
                        break
        except OSError:
            closed = True  # refused, reset or broken pipe: the server let it go
        with lock:
            opened.append(time.monotonic() - start)
            cut.append(closed)

    threads = [threading.Thread(target=one) for _ in range(SLOWLORIS_CONNECTIONS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return SlowLoris(len(opened), sum(cut), max(opened, default=0.0))


def _closed_by_peer(s: socket.socket) -> bool:
    """Whether the server has closed (or answered and closed) the connection."""
    s.setblocking(False)
    try:
        data = s.recv(4096)
    except BlockingIOError:
        return False
    finally:
        s.setblocking(True)
    return data == b"" or data.startswith(b"HTTP/")


def oversized(url: str, model: str, seconds: float) -> Oversized:
    """Send oversized requests back to back for `seconds`: alternately a body over the
    server's size limit and a prompt far longer than any context."""
    import httpx

    statuses: Counter[str] = Counter()
    big_body = b'{"model": "x", "prompt": "' + b"a" * OVERSIZED_BODY_BYTES + b'"}'
    long_prompt = json.dumps({"model": model, "prompt": "word " * (OVERSIZED_PROMPT_CHARS // 5),
                              "max_tokens": 4})  # fmt: skip
    stop_at = time.monotonic() + seconds
    sent = 0
    with httpx.Client(timeout=60) as client:
        while time.monotonic() < stop_at:
            body = big_body if sent % 2 == 0 else long_prompt.encode()
            sent += 1
            try:
                r = client.post(
                    f"{url}/v1/completions",
                    content=body,
                    headers={"Content-Type": "application/json"},
                )
                statuses[str(r.status_code)] += 1
            except httpx.HTTPError:
                statuses["error"] += 1
    return Oversized(sent, dict(statuses))


def run_apart(kind: str, *args: object) -> subprocess.Popen[str]:
    """Start hostile client `kind` ("slowloris": host, port, seconds; "oversized": url, model,
    seconds) in a process of its own, as it would run on another machine; `collect` waits for
    what it met."""
    command = [sys.executable, "-m", "moekit.bench.hostile", kind, *map(str, args)]
    return subprocess.Popen(command, stdout=subprocess.PIPE, text=True)


def collect(process: subprocess.Popen[str]) -> SlowLoris | Oversized:
    """What a client started by `run_apart` met, once it ended."""
    out, _ = process.communicate()
    if process.returncode != 0:
        raise RuntimeError(f"a hostile client exited with code {process.returncode}")
    found = json.loads(out)
    if "cut_by_server" in found:
        return SlowLoris(found["connections"], found["cut_by_server"], found["longest_open_s"])
    return Oversized(found["requests"], found["statuses"])


def main(argv: list[str]) -> None:
    kind, *args = argv
    if kind == "slowloris":
        result: SlowLoris | Oversized = slowloris(args[0], int(args[1]), float(args[2]))
    elif kind == "oversized":
        result = oversized(args[0], args[1], float(args[2]))
    else:
        raise SystemExit(f"unknown hostile client {kind!r}: slowloris or oversized")
    print(json.dumps(result.to_dict()))


if __name__ == "__main__":
    main(sys.argv[1:])
