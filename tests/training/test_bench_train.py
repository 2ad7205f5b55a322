import pytest

from moekit.bench.train import bench_train
from moekit.interop.mixtral import check_mixtral_compatible
from moekit.presets import get_preset


def test_bench_train_measures_both_sides():
    result = bench_train(preset="debug", batch_size=2, seq_len=16, repeats=1)
    assert result["ours_tokens_per_s"] > 0
    assert set(result["hf_tokens_per_s"]) == {"eager", "grouped_mm"}
    assert all(v > 0 for v in result["hf_tokens_per_s"].values())
    best = result["hf_best_impl"]
    ratio = result["ours_tokens_per_s"] / result["hf_tokens_per_s"][best]
    assert result["ours_over_hf_best"] == pytest.approx(ratio)


@pytest.mark.parametrize(
    ("preset", "reason"),
    [("tiny", "no shared experts"), ("small", "every Mixtral layer"), ("deepseek-v3", "softmax")],
)
def test_configs_mixtral_cannot_express_are_refused(preset, reason):
    with pytest.raises(ValueError, match=reason):
        check_mixtral_compatible(get_preset(preset))
