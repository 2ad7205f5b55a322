import pytest

from moekit.bench.train import TrainBench, bench_train
from moekit.interop.mixtral import check_mixtral_compatible
from moekit.presets import get_preset

# The keys of `moekit bench train --json`, in order.
KEYS = [
    "preset",
    "batch_size",
    "seq_len",
    "total_params",
    "active_params",
    "ours_tokens_per_s",
    "hf_tokens_per_s",
    "hf_best_impl",
    "ours_over_hf_best",
]


def test_bench_train_measures_both_sides():
    result = bench_train(preset="debug", batch_size=2, seq_len=16, repeats=1)
    assert result.ours_tokens_per_s > 0
    assert set(result.hf_tokens_per_s) == {"eager", "grouped_mm"}
    assert all(v > 0 for v in result.hf_tokens_per_s.values())
    best = result.hf_best_impl
    assert best is not None
    ratio = result.ours_tokens_per_s / result.hf_tokens_per_s[best]
    assert result.ours_over_hf_best == pytest.approx(ratio)
    data = result.to_dict()
    assert list(data) == KEYS
    assert data["hf_best_impl"] == best and data["ours_over_hf_best"] == pytest.approx(ratio)


def test_to_dict_has_the_json_keys_with_and_without_transformers():
    figures = dict(preset="p", batch_size=2, seq_len=8, total_params=10, active_params=5,
                   ours_tokens_per_s=300.0)  # fmt: skip
    data = TrainBench(**figures, hf_tokens_per_s={"eager": 100.0, "grouped_mm": 200.0}).to_dict()
    assert list(data) == KEYS
    assert data["hf_best_impl"] == "grouped_mm" and data["ours_over_hf_best"] == 1.5
    alone = TrainBench(**figures, hf_tokens_per_s={}).to_dict()
    assert list(alone) == KEYS
    assert alone["hf_best_impl"] is None and alone["ours_over_hf_best"] is None


@pytest.mark.parametrize(
    ("preset", "reason"),
    [("tiny", "no shared experts"), ("small", "every Mixtral layer"), ("deepseek-v3", "softmax")],
)
def test_configs_mixtral_cannot_express_are_refused(preset, reason):
    with pytest.raises(ValueError, match=reason):
        check_mixtral_compatible(get_preset(preset))
