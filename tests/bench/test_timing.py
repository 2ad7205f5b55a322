import time
from pathlib import Path

import pytest

from moekit.bench.timing import (
    StolenTime,
    _cpu_ticks,
    calls_per_sample,
    fastest,
    medians,
    round_robin,
    seconds,
    time_interleaved,
    with_prefix,
)


def _counter():
    calls = []

    def fn():
        calls.append(len(calls))

    return fn, calls


def test_round_robin_takes_the_functions_in_turn():
    order = []
    fns = {"a": lambda: order.append("a"), "b": lambda: order.append("b")}
    samples = round_robin(fns, repeats=3)
    assert order == ["a", "b"] * 3
    assert set(samples) == {"a", "b"} and all(len(s) == 3 for s in samples.values())
    assert all(t >= 0 for s in samples.values() for t in s)


def test_round_robin_repeats_calls_within_a_sample():
    a, a_calls = _counter()
    b, b_calls = _counter()
    round_robin({"a": a, "b": b}, repeats=2, calls={"a": 5, "b": 1})
    assert (len(a_calls), len(b_calls)) == (10, 2)


def test_calls_per_sample_warms_up_and_fills_the_sample():
    fn, calls = _counter()
    assert calls_per_sample({"fast": fn}, min_sample_s=0.0) == {"fast": 1}
    assert len(calls) == 2  # one warm-up call, one measured call
    # A call far shorter than the sample is repeated in a row.
    assert calls_per_sample({"fast": fn}, min_sample_s=1.0)["fast"] > 1


def test_time_interleaved_gives_a_median_per_function():
    fn, calls = _counter()
    times = time_interleaved({"f": fn}, repeats=3, min_sample_s=0.0)
    assert list(times) == ["f"] and times["f"] >= 0
    assert len(calls) == 2 + 3  # warm-up and measurement, then one call per sample


def test_medians_fastest_and_prefixes():
    assert medians({"a": [3.0, 1.0, 2.0], "b": [4.0, 6.0]}) == {"a": 2.0, "b": 5.0}
    times = {"ours": 1.0, "hf_eager": 3.0, "hf_grouped_mm": 2.0}
    assert with_prefix(times, "hf_") == {"eager": 3.0, "grouped_mm": 2.0}
    assert fastest(with_prefix(times, "hf_")) == "grouped_mm"
    assert fastest({}) is None


def test_seconds_times_one_call():
    fn, calls = _counter()
    assert seconds(fn) >= 0 and calls == [0]


def _stat(path, steal, idle):
    # user nice system idle iowait irq softirq steal guest guest_nice, then a CPU's own line
    path.write_text(f"cpu  100 0 20 {idle} 0 0 0 {steal} 0 0\ncpu0 50 0 10 {idle} 0 0 0 0 0 0\n")


def test_stolen_time_is_the_hypervisors_share_of_the_ticks_in_between(tmp_path):
    stat = tmp_path / "stat"
    _stat(stat, steal=10, idle=870)  # 1000 ticks since boot
    with StolenTime(stat) as stolen:
        _stat(stat, steal=40, idle=940)  # 100 more ticks, 30 of them stolen
    assert stolen.share == pytest.approx(0.3)


def test_stolen_time_is_none_where_it_cannot_be_read(tmp_path):
    with StolenTime(tmp_path / "missing") as stolen:
        pass
    assert stolen.share is None
    bad = tmp_path / "stat"
    bad.write_text("intr 1 2 3\n")
    with StolenTime(bad) as stolen:
        pass
    assert stolen.share is None


def test_stolen_time_reads_this_machine():
    stat = Path("/proc/stat")
    before = _cpu_ticks(stat)
    with StolenTime() as stolen:
        time.sleep(0.2)  # a few clock ticks of every CPU
    after = _cpu_ticks(stat)
    if before is None or after is None or after[1] <= before[1]:
        pytest.skip("no /proc/stat whose ticks move here")
    assert stolen.share is not None and 0.0 <= stolen.share <= 1.0
