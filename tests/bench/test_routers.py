"""`python -m moekit.bench.routers`: both routers timed, the ratio is theirs."""

import json

import pytest

from moekit.bench.routers import bench_routers, main


def test_both_passes_are_timed_and_the_ratio_is_hierarchical_over_flat():
    rows = bench_routers(dim=16, tokens=64, repeats=2)
    assert [r.phase for r in rows] == ["fwd", "fwd_bwd"]
    for r in rows:
        assert r.flat_us > 0 and r.hierarchical_us > 0
        assert r.ratio == pytest.approx(r.hierarchical_us / r.flat_us)


def test_the_command_prints_one_json_row_per_pass(capsys):
    main(["--dim", "16", "--tokens", "32", "--repeats", "1", "--experts", "8", "--top-k", "4",
          "--groups", "4", "--group-top-k", "2"])  # fmt: skip
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["phase"] for r in rows] == ["fwd", "fwd_bwd"]
