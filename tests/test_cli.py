"""`moekit bench layer` through the console script."""

import json

import pytest

from .cli.conftest import run


@pytest.mark.slow
def test_bench_layer_json_rows():
    proc = run("bench", "layer", "--json", "--dim", "64", "--prefill-tokens", "64",
               "--repeats", "1")  # fmt: skip
    rows = json.loads(proc.stdout)
    assert len(rows) == 8
    assert {(r["shape"], r["phase"], r["pass"]) for r in rows} == {
        (s, ph, pa) for s in ("coarse", "fine") for ph in ("prefill", "decode")
        for pa in ("fwd", "fwd_bwd")
    }  # fmt: skip
    for r in rows:
        assert r["ours_s"] > 0 and r["dense_s"] > 0
        assert r["hf_best_s"] is None or r["hf_best_s"] > 0
        # Same weights, same routing: our output equals transformers' Mixtral block.
        if r["max_abs_diff_hf"] is not None:
            assert r["max_abs_diff_hf"] < 1e-5


def test_bench_layer_rejects_unknown_shapes():
    proc = run("bench", "layer", "--shapes", "huge", check=False)
    assert proc.returncode == 2 and "unknown shape" in proc.stderr
