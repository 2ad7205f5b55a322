import pytest

pytest.importorskip("transformers")


def test_bench_generate_against_transformers(tiny_model_dir):
    from moekit.bench.generate import bench_generate

    result = bench_generate(tiny_model_dir, prompt_tokens=16, new_tokens=6, repeats=1)
    # Same weights, same greedy decoding: transformers' Mixtral produces the same tokens.
    assert result["same_tokens"] is True
    for key in ("ours_prefill_tokens_per_s", "hf_prefill_tokens_per_s", "ours_decode_tokens_per_s"):
        assert result[key] > 0
    assert result["prefill_ours_over_hf"] == pytest.approx(
        result["ours_prefill_tokens_per_s"] / result["hf_prefill_tokens_per_s"]
    )
