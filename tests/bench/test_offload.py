from moekit.bench.offload import bench_offload


def test_bench_offload_rows_match_the_loaded_model(tiny_model_dir):
    r = bench_offload(tiny_model_dir, prompt_tokens=8, new_tokens=4, fractions=(1.0, 0.25))
    assert [(row.slots, row.prefetch) for row in r.rows] == [
        (8, False), (8, True), (2, False), (2, True), (1, False), (1, True)
    ]  # fmt: skip
    assert all(row.same_tokens for row in r.rows)
    assert all(row.tokens_per_s > 0 and row.bytes_read > 0 for row in r.rows)
    full, one = r.rows[0], r.rows[4]
    assert full.hit_rate is not None and one.hit_rate is not None
    assert full.hit_rate > one.hit_rate  # a cache that holds every expert reads each once
    assert r.to_dict()["rows"][1]["prefetch_accuracy"] is not None
