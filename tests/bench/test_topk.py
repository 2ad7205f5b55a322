"""`moekit bench topk` on a tiny trained run: one row per k, the trained k the reference."""

import math

import pytest

from moekit.bench.topk import bench_topk
from moekit.cli.commands import main


def test_bench_topk_measures_each_k_against_the_trained_one(trained_dir, capsys):
    result = bench_topk(trained_dir, val_batches=1, prompts=2, new_tokens=4, repeats=1)
    trained = result.trained_k
    assert [r.k for r in result.rows] == list(range(1, min(result.max_k, 2 * trained) + 1))
    ref = next(r for r in result.rows if r.k == trained)
    assert ref.top1_agreement == 1.0 and ref.greedy_agreement == 1.0
    for row in result.rows:
        assert math.isfinite(row.val_loss) and row.decode_tokens_per_s > 0
        assert 0.0 <= row.top1_agreement <= 1.0
    # Another k routes differently: its loss is not the trained k's.
    assert any(r.val_loss != ref.val_loss for r in result.rows if r.k != trained)
    assert main(["bench", "topk", str(trained_dir), "--k", "1", "--val-batches", "1",
                 "--prompts", "1", "--new-tokens", "2", "--repeats", "1"]) == 0  # fmt: skip
    assert "experts per token vs the trained" in capsys.readouterr().out


def test_bench_topk_refuses_a_k_the_routers_cannot_give(trained_dir):
    with pytest.raises(ValueError, match=r"k=99 is invalid for this model: must be in 1\.\."):
        bench_topk(trained_dir, ks=(1, 99), val_batches=1, prompts=1, new_tokens=1, repeats=1)
