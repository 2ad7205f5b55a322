import pytest

from moekit.params import count_params
from moekit.presets import get_preset
from moekit.speed import expected_distinct, measure_bandwidth, predict_decode, step_bytes


def test_step_bytes_of_the_demo_model_at_batch_1():
    cfg = get_preset("demo")
    sb = step_bytes(cfg, batch=1, context=0)
    moe = cfg.moe
    assert moe is not None
    # Exactly the top-k experts of every layer, three matrices each, float32.
    assert sb.by_part["routed_experts"] == 4 * moe.top_k * 3 * cfg.dim * moe.expert_hidden * 4
    assert sb.by_part["embeddings"] == cfg.dim * 4  # one row
    assert sb.by_part["lm_head"] == cfg.vocab_size * cfg.dim * 4
    assert sb.by_part["kv_cache"] == 0
    # Everything active except the embedding table is read once.
    pc = count_params(cfg)
    assert sb.total == (pc.active - pc.active_by["embeddings"] + cfg.dim) * 4


def test_batches_share_experts_and_read_the_kv_cache():
    cfg = get_preset("demo")
    one, four = step_bytes(cfg, batch=1, context=100), step_bytes(cfg, batch=4, context=100)
    assert four.per_token < one.per_token  # weights are shared by the batch
    assert four.by_part["kv_cache"] == 4 * one.by_part["kv_cache"] > 0
    assert expected_distinct(8, 2, 1) == 2 and 2 < expected_distinct(8, 2, 4) < 8


def test_prediction_and_the_budget_extension_point():
    cfg = get_preset("demo")
    full = predict_decode(cfg, 1e10)
    assert full.tokens_per_s == pytest.approx(1e10 / full.bytes.total)
    paged = predict_decode(cfg, 1e10, expert_hit_rate=0.5, miss_bandwidth=1e9)
    assert paged.tokens_per_s < full.tokens_per_s
    with pytest.raises(ValueError, match="expert_hit_rate"):
        predict_decode(cfg, 1e10, expert_hit_rate=1.5)
    with pytest.raises(ValueError, match="misses"):
        predict_decode(cfg, 1e10, expert_hit_rate=0.5)


def test_measured_bandwidth_is_plausible():
    assert 1e8 < measure_bandwidth(size_mib=32, repeats=2) < 1e13


def test_quantised_experts_count_as_stored():
    from moekit.config import QuantizationConfig

    cfg = get_preset("demo")
    full = step_bytes(cfg, batch=1, context=0)
    cfg.quantization = QuantizationConfig(bits=4, group_size=32)
    int4 = step_bytes(cfg, batch=1, context=0)
    assert int4.by_part["routed_experts"] == round(full.by_part["routed_experts"] * 0.75 / 4)
    assert int4.by_part["attention"] == full.by_part["attention"]  # parts="experts" only
    cfg.quantization = QuantizationConfig(bits=8, parts="all")
    int8 = step_bytes(cfg, batch=1, context=0)
    assert int8.by_part["attention"] < full.by_part["attention"] / 3


def test_expected_hit_rate_is_the_cached_share_under_uniform_routing():
    from moekit.speed import expected_hit_rate

    assert expected_hit_rate(2, 8) == 0.25 and expected_hit_rate(8, 8) == 1.0
    assert expected_hit_rate(16, 8) == 1.0
    with pytest.raises(ValueError, match="slots"):
        expected_hit_rate(0, 8)


def test_read_bandwidth_of_a_real_file_and_of_a_temporary_one(tmp_path):
    from moekit.speed import measure_read_bandwidth

    path = tmp_path / "weights.bin"
    path.write_bytes(b"\1" * (3 * 2**20 + 5))
    assert 1e7 < measure_read_bandwidth(path, chunk_bytes=2**18, repeats=1) < 1e13
    assert 1e7 < measure_read_bandwidth(size_mib=2, repeats=1) < 1e13
    (tmp_path / "empty").write_bytes(b"")
    with pytest.raises(ValueError, match="empty"):
        measure_read_bandwidth(tmp_path / "empty")
