"""`moekit bench prune` on a tiny trained run: one row per (criterion, experts kept) and the
unpruned model, each pruned and healed model written, the losses and sizes measured."""

import json
import math

import pytest

from moekit.bench.prune import bench_prune
from moekit.cli.commands import main
from moekit.model_dir import ModelDir


def test_bench_prune_measures_every_pruned_and_healed_model(trained_dir, tmp_path):
    result = bench_prune(trained_dir, tmp_path / "p", keep=(3, 2), calibration_tokens=256,
                         val_batches=1, heal_steps=2, repeats=1, say=lambda _: None)  # fmt: skip
    assert [(r.criterion, r.experts) for r in result.rows] == [
        ("none", 4), ("reap", 3), ("reap", 2), ("frequency", 3), ("frequency", 2)
    ]  # fmt: skip
    full = result.rows[0]
    for r in result.rows:
        assert math.isfinite(r.val_loss) and math.isfinite(r.healed_val_loss)
        assert r.decode_tokens_per_s > 0
        assert r.expert_bytes * 4 == full.expert_bytes * r.experts  # the kept experts' bytes
    assert all(r.val_loss != full.val_loss for r in result.rows[1:])  # pruning costs loss
    for name in ("reap-3", "frequency-2"):
        assert ModelDir(tmp_path / "p" / name).config().moe.num_experts == int(name[-1])
        healed = ModelDir(tmp_path / "p" / f"{name}-healed")
        assert [m["step"] for m in healed.read_metrics() if "loss" in m][-1] == 2
    assert (tmp_path / "p" / "full-healed" / "model.safetensors").is_file()
    assert json.dumps(result.to_dict())


def test_bench_prune_refuses_counts_it_cannot_keep(trained_dir, tmp_path, capsys):
    for keep in ((1,), (4,)):
        with pytest.raises(
            ValueError, match=r"keeping \d experts is invalid: choose counts in 2\.\.3"
        ):
            bench_prune(trained_dir, tmp_path / "x", keep=keep, say=lambda _: None)
    assert main(["bench", "prune", str(trained_dir), "--out", str(tmp_path / "c"), "--keep", "2",
                 "--criteria", "frequency", "--calibration-tokens", "128", "--val-batches", "1",
                 "--heal-steps", "0", "--repeats", "1"]) == 0  # fmt: skip
    assert "experts kept" in capsys.readouterr().out
