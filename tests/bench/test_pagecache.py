from moekit.bench.pagecache import cached_fraction, drop_from_page_cache


def test_a_dropped_file_leaves_the_page_cache_and_a_read_brings_it_back(tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(b"\1" * (1 << 20))
    assert drop_from_page_cache([path])
    dropped = cached_fraction([path])
    assert dropped is not None and dropped < 0.5
    path.read_bytes()
    assert cached_fraction([path]) == 1.0
