"""`moekit bench quant` on a tiny trained run: one row per setting, figures in range."""

import pytest

from moekit.bench.quant import bench_quant, bench_quant_kernels
from moekit.cli.commands import main


def test_bench_quant_measures_every_setting(trained_dir, capsys):
    result = bench_quant(trained_dir, val_batches=1, prompts=2, new_tokens=4, repeats=1)
    assert [r.name for r in result.rows] == ["float32", "int8", "int4 g32"]
    ref, int8, int4 = result.rows
    assert ref.top1_agreement == 1.0 and ref.greedy_agreement == 1.0
    assert int4.expert_bytes < int8.expert_bytes < ref.expert_bytes
    for row in (int8, int4):
        assert 0.5 < row.top1_agreement <= 1.0
        assert abs(row.val_loss - ref.val_loss) < 0.5
    assert set(int8.experts_us) == {"dequant", "torch"}
    assert set(int4.experts_us) == {"dequant", "torch", "compiled"}
    assert main(["bench", "quant", str(trained_dir), "--val-batches", "1", "--prompts", "1",
                 "--new-tokens", "2", "--repeats", "1"]) == 0  # fmt: skip
    assert "int4 g32" in capsys.readouterr().out


def test_bench_quant_kernels_times_every_kernel_at_a_preset_shape(capsys):
    result = bench_quant_kernels(("debug",), rows=(1,), experts=2, repeats=1)
    assert result.bandwidth > 0 and result.experts == 2
    got = {(r.setting, r.kernel) for r in result.rows}
    assert got == {("float32", "float"), ("int8", "dequant"), ("int8", "torch"),
                   ("int4 g32", "dequant"), ("int4 g32", "torch"), ("int4 g32", "compiled")}  # fmt: skip
    by = {(r.setting, r.kernel): r for r in result.rows}
    ref = by["float32", "float"]
    assert ref.weight_bytes == 3 * 64 * 96 * 4 and ref.vs_float32 == 1.0
    # int4 reads 4 bits a weight plus a float32 scale and minimum per group of 32
    assert by["int4 g32", "compiled"].weight_bytes == 3 * 64 * 96 * 6 // 8
    for r in result.rows:
        assert r.us > 0 and r.gb_per_s > 0
        assert r.of_bandwidth == pytest.approx(r.gb_per_s * 1e9 / result.bandwidth)
    assert main(["bench", "quant", "--kernels", "--presets", "debug", "--rows", "1",
                 "--repeats", "1"]) == 0  # fmt: skip
    assert "compiled" in capsys.readouterr().out


def test_bench_quant_names_what_is_missing_or_malformed(capsys):
    assert main(["bench", "quant"]) == 2
    assert "needs a model directory (or --kernels)" in capsys.readouterr().err
    assert main(["bench", "quant", "--kernels", "--rows", "1,x"]) == 2
    assert "--rows '1,x'" in capsys.readouterr().err
