import pytest
from PIL import Image

from moekit.bench.offload import bench_offload
from moekit.bench.offload_plot import plot_offload


def test_bench_offload_rows_match_the_loaded_model(tiny_model_dir, tmp_path):
    r = bench_offload(tiny_model_dir, prompt_tokens=8, new_tokens=4, fractions=(1.0, 0.25))
    assert [(row.slots, row.prefetch) for row in r.rows] == [
        (8, False), (8, True), (2, False), (2, True), (1, False), (1, True)
    ]  # fmt: skip
    assert all(row.same_tokens for row in r.rows)
    assert all(row.tokens_per_s > 0 and row.bytes_read > 0 for row in r.rows[2:])
    full, one = r.rows[0], r.rows[4]
    assert full.hit_rate is not None and one.hit_rate is not None
    # Measured over the last timed run: a cache of every expert holds those read before.
    assert full.hit_rate > one.hit_rate and full.bytes_read < one.bytes_read
    assert r.to_dict()["rows"][3]["prefetch_accuracy"] is not None
    # The prediction of `info --speed --max-memory` for each budget.
    assert [row.expected_hit_rate for row in r.rows[::2]] == [1.0, 0.25, 0.125]
    assert full.predicted_tokens_per_s == r.loaded_predicted_tokens_per_s
    assert full.predicted_vs_loaded == 1.0 > r.rows[2].predicted_vs_loaded > one.predicted_vs_loaded
    # The calibrated figure: the loaded model timed in turn with the row, slowed by its misses.
    assert full.calibrated_tokens_per_s == pytest.approx(full.loaded_tokens_per_s)
    assert all(row.loaded_tokens_per_s > row.calibrated_tokens_per_s for row in r.rows[2:])
    assert all(row.vs_loaded == row.tokens_per_s / row.loaded_tokens_per_s for row in r.rows)
    assert not any(row.cold for row in r.rows)
    png = plot_offload(r, tmp_path / "plots" / "offload.png")
    with Image.open(png) as image:
        assert image.format == "PNG" and image.size[0] > image.size[1] > 100


def test_cold_rows_start_with_the_weight_files_out_of_the_page_cache(tiny_model_dir):
    r = bench_offload(tiny_model_dir, prompt_tokens=8, new_tokens=4, fractions=(0.25,), cold=True)
    assert all(row.cold and row.same_tokens for row in r.rows)
    assert all(row.page_cache is not None and row.page_cache < 0.5 for row in r.rows)


def test_the_command_says_whether_the_page_cache_was_dropped_and_draws_the_plot(
    tiny_model_dir, tmp_path, capsys
):
    import json

    from moekit.cli import main

    plot = tmp_path / "offload.png"
    argv = ["bench", "offload", str(tiny_model_dir), "--prompt-tokens", "8", "--new-tokens", "4",
            "--fractions", "0.25", "--repeats", "1"]  # fmt: skip
    assert main([*argv, "--cold", "--plot", str(plot), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["plot"] == str(plot) and plot.stat().st_size > 1000
    assert all(row["cold"] for row in data["rows"])
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "weight files left cached" in out and "experts paged under a budget" in out
