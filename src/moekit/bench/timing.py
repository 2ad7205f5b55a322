"""How the benchmarks time their candidates: round-robin samples and their medians.

Every benchmark compares candidates measured in the same run; sampling them in turn puts each
under the same machine conditions (clock, memory pressure, other load), and the median of the
samples ignores the odd one disturbed by something else.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping
from pathlib import Path

Candidates = Mapping[str, Callable[[], object]]


def seconds(fn: Callable[[], object]) -> float:
    """Wall-clock seconds of one call of `fn`."""
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def calls_per_sample(fns: Candidates, min_sample_s: float) -> dict[str, int]:
    """How many calls in a row make a sample of each function last at least `min_sample_s`,
    so that timer resolution does not matter. Calls each function twice: once to warm it up
    (first-call allocations, caches) and once to measure it."""
    calls = {}
    for name, fn in fns.items():
        fn()
        calls[name] = max(1, int(min_sample_s / max(seconds(fn), 1e-9)))
    return calls


def round_robin(
    fns: Candidates, repeats: int, calls: Mapping[str, int] | None = None
) -> dict[str, list[float]]:
    """`repeats` samples of seconds per call of each function, taking the functions in turn;
    a sample of a function is `calls[name]` calls in a row (one without `calls`)."""
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            n = calls[name] if calls else 1
            t0 = time.perf_counter()
            for _ in range(n):
                fn()
            samples[name].append((time.perf_counter() - t0) / n)
    return samples


def medians(samples: Mapping[str, list[float]]) -> dict[str, float]:
    """The median of each name's samples."""
    return {name: statistics.median(ts) for name, ts in samples.items()}


def time_interleaved(fns: Candidates, repeats: int, min_sample_s: float = 0.05) -> dict[str, float]:
    """Median seconds per call of each function over `repeats` round-robin samples, each
    function warmed up first and each sample lasting at least `min_sample_s`
    (see `calls_per_sample`)."""
    return medians(round_robin(fns, repeats, calls_per_sample(fns, min_sample_s)))


def with_prefix(times: Mapping[str, float], prefix: str) -> dict[str, float]:
    """The entries whose name starts with `prefix`, named without it (e.g. the reference's
    implementations among the candidates: "hf_eager" -> "eager")."""
    return {k.removeprefix(prefix): v for k, v in times.items() if k.startswith(prefix)}


def fastest(times: Mapping[str, float]) -> str | None:
    """The name with the fewest seconds, or None when there is none."""
    return min(times, key=times.__getitem__) if times else None


def _cpu_ticks(stat: Path) -> tuple[int, int] | None:
    """(ticks stolen, ticks in all) over every CPU since boot, from Linux's /proc/stat (the
    eighth number of its `cpu` line is the time a hypervisor ran something else while this
    machine's virtual CPUs wanted to run); None where that cannot be read."""
    try:
        fields = stat.read_text().split("\n", 1)[0].split()
    except OSError:
        return None
    if len(fields) < 9 or fields[0] != "cpu":
        return None
    ticks = [int(f) for f in fields[1:9]]  # user nice system idle iowait irq softirq steal
    return ticks[7], sum(ticks)


class StolenTime:
    """The share of this machine's CPU time that its hypervisor gave to others while the
    `with` block ran (Linux; `share` is None elsewhere). On a shared virtual machine this is
    when timings stop meaning what they say: a thread that waits for its partner at a barrier
    waits for as long as the partner's virtual CPU is descheduled."""

    def __init__(self, stat: str | Path = "/proc/stat") -> None:
        self.stat = Path(stat)
        self.share: float | None = None

    def __enter__(self) -> StolenTime:
        self._start = _cpu_ticks(self.stat)
        return self

    def __exit__(self, *exc: object) -> None:
        end = _cpu_ticks(self.stat)
        if self._start is not None and end is not None and end[1] > self._start[1]:
            share = (end[0] - self._start[0]) / (end[1] - self._start[1])
            self.share = min(max(share, 0.0), 1.0)
