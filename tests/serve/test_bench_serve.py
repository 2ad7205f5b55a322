"""`moekit bench serve`: one client against many."""

import pytest


def test_bench_serve_measures_one_and_many_clients(tiny_model_dir):
    from moekit.bench.serve import bench_serve

    result = bench_serve(tiny_model_dir, clients=4, seconds=1.5, new_tokens=8)
    assert result["one_client"]["tokens"] > 0 and result["many_clients"]["tokens"] > 0
    assert result["many_clients"]["clients"] == 4
    assert result["speedup"] == pytest.approx(
        result["many_clients"]["tokens_per_s"] / result["one_client"]["tokens_per_s"]
    )
    assert result["mean_decode_batch"] > 1  # the clients' requests shared decode steps
