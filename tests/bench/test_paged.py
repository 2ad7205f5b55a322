import pytest

from moekit.bench.paged import bench_generate_paged
from moekit.infer.offload import OffloadConfig, plan_budget
from moekit.model import meta_model
from moekit.model_dir import ModelDir


def _budget(model_dir, slots, prefetch=True):
    plan = plan_budget(meta_model(ModelDir(model_dir).config()), 2**40)
    budget = plan.resident + slots * sum(plan.expert.values())
    return OffloadConfig(max_memory=budget, prefetch=prefetch)


def test_paged_generation_is_measured_beside_its_prediction(tiny_model_dir):
    r = bench_generate_paged(
        tiny_model_dir, _budget(tiny_model_dir, 2), prompt_tokens=8, new_tokens=6, repeats=1
    )
    assert r.decode_tokens_per_s > 0 and r.prefill_tokens_per_s > 0
    assert r.expected_hit_rate == 0.25 and r.prediction.expert_hit_rate == 0.25
    assert r.decode_hit_rate is not None and 0 <= r.decode_hit_rate <= 1
    assert r.offload["slots_per_layer"] == 2 and r.offload["bytes_read"] > 0
    data = r.to_dict()
    assert data["measured_over_predicted"] == r.decode_tokens_per_s / r.prediction.tokens_per_s


def test_a_cache_of_every_expert_hits_every_time_while_decoding(tiny_model_dir):
    r = bench_generate_paged(
        tiny_model_dir, _budget(tiny_model_dir, 8, prefetch=False), prompt_tokens=8,
        new_tokens=4, repeats=1,
    )  # fmt: skip
    assert r.decode_hit_rate == 1.0 and r.expected_hit_rate == 1.0
    assert r.prediction.miss_bandwidth is None


def test_bench_generate_takes_the_offload_flags(tiny_model_dir, capsys):
    import json

    from moekit.cli import main

    budget = str(_budget(tiny_model_dir, 2).max_memory)
    argv = ["bench", "generate", str(tiny_model_dir), "--max-memory", budget, "--prompt-tokens",
            "8", "--new-tokens", "4", "--repeats", "1", "--expert-cache", "lfu", "--no-prefetch"]  # fmt: skip
    assert main([*argv, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["offload"]["policy"] == "lfu" and data["offload"]["prefetch"] is False
    assert data["expected_hit_rate"] == 0.25
    assert main(argv) == 0
    assert "expected 25.0% (uniform routing)" in capsys.readouterr().out
    assert main(["bench", "generate", "--max-memory", "1GiB"]) != 0
    assert "name one" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # argparse refuses it
        main(["bench", "generate", str(tiny_model_dir), "--max-memory", "6XB"])
    assert "is not a memory size" in capsys.readouterr().err


def test_a_random_quantised_directory_runs_on_token_ids_with_sampling(tmp_path, capsys):
    """`quantize --preset` writes no tokenizer: the bench feeds ids, samples when asked, and
    reports the peak memory; the plan counts the int4 experts as stored."""
    import json

    from moekit.cli import main
    from moekit.quant.build import meta_model as qmeta_model

    out = tmp_path / "q"
    assert main(["quantize", "--preset", "tiny", "--bits", "4", "--out", str(out)]) == 0
    assert not any(ModelDir(out).tokenizer_files())
    plan = plan_budget(qmeta_model(ModelDir(out).config()), 2**40)
    float_plan = plan_budget(meta_model(ModelDir(out).config()), 2**40)
    assert max(plan.expert.values()) < max(float_plan.expert.values()) / 4
    budget = str(plan.resident + 3 * sum(plan.expert.values()))
    argv = ["bench", "generate", str(out), "--max-memory", budget, "--prompt-tokens", "4",
            "--new-tokens", "4", "--repeats", "1", "--sample", "--json"]  # fmt: skip
    capsys.readouterr()
    assert main(argv) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["sampled"] is True and data["offload"]["slots_per_layer"] == 3
    assert data["peak_rss_bytes"] >= data["baseline_rss_bytes"] > 0
