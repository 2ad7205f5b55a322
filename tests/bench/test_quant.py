"""`moekit bench quant` on a tiny trained run: one row per setting, figures in range."""

import pytest

from moekit.bench.quant import bench_quant
from moekit.cli.commands import main


@pytest.fixture(scope="module")
def trained_dir(tmp_path_factory):
    from moekit import train
    from moekit.training.config import resolve_run_config

    from ..conftest import TINY_RUN

    out = tmp_path_factory.mktemp("run") / "run"
    cfg = resolve_run_config(preset="debug", overrides=[*TINY_RUN, "train.max_steps=2"])
    train(cfg, out, verbose=False, report=False)
    return out


def test_bench_quant_measures_every_setting(trained_dir, capsys):
    result = bench_quant(trained_dir, val_batches=1, prompts=2, new_tokens=4, repeats=1)
    assert [r.name for r in result.rows] == ["float32", "int8", "int4 g32"]
    ref, int8, int4 = result.rows
    assert ref.top1_agreement == 1.0 and ref.greedy_agreement == 1.0
    assert int4.expert_bytes < int8.expert_bytes < ref.expert_bytes
    for row in (int8, int4):
        assert 0.5 < row.top1_agreement <= 1.0
        assert abs(row.val_loss - ref.val_loss) < 0.5
        assert set(row.experts_us) == {"dequant", "torch"}
    assert main(["bench", "quant", str(trained_dir), "--val-batches", "1", "--prompts", "1",
                 "--new-tokens", "2", "--repeats", "1"]) == 0  # fmt: skip
    assert "int4 g32" in capsys.readouterr().out
