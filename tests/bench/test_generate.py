import pytest
import torch

from moekit.bench.generate import GenerateBench, PhaseSpeed, count_calls, profiled_calls
from moekit.presets import get_preset
from moekit.speed import predict_decode

# The keys of `moekit bench generate --json`, in order.
KEYS = [
    "model",
    "batch_size",
    "prompt_tokens",
    "new_tokens",
    "ours_prefill_tokens_per_s",
    "hf_prefill_tokens_per_s",
    "ours_decode_tokens_per_s",
    "hf_decode_tokens_per_s",
    "same_tokens",
    "hf_experts_implementation",
    "prefill_ours_over_hf",
    "decode_ours_over_hf",
    "ours_calls_per_step",
    "hf_calls_per_step",
    "bound",
    "decode_fraction_of_bound",
    "quantization",
    "compiled",
    "ours_warmup_s",
    "eager_decode_tokens_per_s",
    "eager_calls_per_step",
    "no_reference",
    "stolen_cpu",
]


def test_bench_generate_against_transformers(tiny_model_dir):
    pytest.importorskip("transformers")
    from moekit.bench.generate import bench_generate

    result = bench_generate(tiny_model_dir, prompt_tokens=16, new_tokens=6, repeats=1)
    # Same weights, same greedy decoding: transformers' Mixtral produces the same tokens.
    assert result.same_tokens is True
    speeds = (result.prefill.ours_tokens_per_s, result.prefill.hf_tokens_per_s,
              result.decode.ours_tokens_per_s)  # fmt: skip
    assert all(s > 0 for s in speeds)
    assert result.prefill.ours_over_hf == pytest.approx(
        result.prefill.ours_tokens_per_s / result.prefill.hf_tokens_per_s
    )
    data = result.to_dict()
    assert list(data) == KEYS
    assert data["prefill_ours_over_hf"] == pytest.approx(
        data["ours_prefill_tokens_per_s"] / data["hf_prefill_tokens_per_s"]
    )
    # Both sides make PyTorch calls per step; the bound is positive and ours is a fraction.
    assert result.ours_calls_per_step > 0 and result.hf_calls_per_step > 0
    assert result.bound.tokens_per_s > 0 and result.bound.bandwidth > 1e8
    assert data["decode_fraction_of_bound"] == pytest.approx(
        data["ours_decode_tokens_per_s"] / data["bound"]["predicted_tokens_per_s"]
    )
    # Compiled by default: the eager path ran beside it and makes more calls per step.
    assert result.compiled is True and result.eager_decode_tokens_per_s > 0
    assert 0 < result.ours_calls_per_step < result.eager_calls_per_step


def test_a_quantised_directory_is_measured_alone_against_its_stored_bytes(tmp_path, capsys):
    """transformers cannot compute from packed weights: ours runs alone (token ids, as
    `quantize --preset` writes no tokenizer) and the bound counts the int4 experts as stored."""
    import dataclasses
    import json

    from moekit.cli import main
    from moekit.model_dir import ModelDir
    from moekit.speed import step_bytes

    out = tmp_path / "q"
    assert main(["quantize", "--preset", "tiny", "--bits", "4", "--out", str(out)]) == 0
    argv = ["bench", "generate", str(out), "--prompt-tokens", "4", "--new-tokens", "4",
            "--repeats", "1", "--no-compile", "--json"]  # fmt: skip
    capsys.readouterr()
    assert main(argv) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["quantization"] == "int4 (groups of 32), experts"
    assert data["hf_decode_tokens_per_s"] is None and data["decode_ours_over_hf"] is None
    assert data["hf_calls_per_step"] is None and data["same_tokens"] is None
    assert data["ours_decode_tokens_per_s"] > 0 and data["compiled"] is False
    cfg = ModelDir(out).config()
    stored = step_bytes(cfg, context=4 + 4 // 2).total
    assert data["bound"]["bytes_per_step"] == stored
    assert stored < step_bytes(dataclasses.replace(cfg, quantization=None), context=6).total
    # The table names the weights and says why transformers did not run.
    assert main(argv[:-1]) == 0
    text = capsys.readouterr().out
    assert "int4 (groups of 32), experts" in text
    assert "transformers: not run (it cannot compute from moekit's packed weights)" in text


def test_a_model_transformers_cannot_represent_is_measured_alone(tmp_path, capsys):
    """A hierarchical router has no transformers architecture: ours runs alone, saying why."""
    import json

    from moekit import build_model
    from moekit.cli import main
    from moekit.config import ModelConfig
    from moekit.model_dir import save_model

    cfg = ModelConfig.from_dict(
        dict(vocab_size=256, dim=32, num_layers=1, num_heads=2, num_kv_heads=1, ffn_hidden=64,
             max_seq_len=64, moe=dict(num_experts=4, top_k=2, expert_hidden=32,
                                      router="hierarchical", router_groups=2, group_top_k=1))
    )  # fmt: skip
    save_model(build_model(cfg, seed=0), cfg, tmp_path / "m")
    argv = ["bench", "generate", str(tmp_path / "m"), "--prompt-tokens", "4", "--new-tokens",
            "4", "--repeats", "1", "--no-compile", "--json"]  # fmt: skip
    capsys.readouterr()
    assert main(argv) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["hf_decode_tokens_per_s"] is None and data["ours_decode_tokens_per_s"] > 0
    assert data["no_reference"].startswith("no Hugging Face architecture represents this model")
    assert "moe.router='hierarchical'" in data["no_reference"]


def test_count_calls_counts_each_operator():
    x = torch.ones(3)
    assert count_calls(lambda: x + 1) == 1
    assert count_calls(lambda: (x + 1).mul(2).sum()) == 3


def test_profiled_calls_count_the_operators_called_from_python():
    x, w = torch.ones(2, 3), torch.ones(4, 3)
    assert profiled_calls(lambda: (x + 1).mul(2).sum()) == 3
    # A composite operator is one call, not the operators it is made of.
    assert profiled_calls(lambda: torch.nn.functional.linear(x, w)) == 1


def _result(batch_size=2, stolen_cpu=None):
    """A bench result with made-up speeds (300 / 100 tok/s prefill, 10 / 20 decode)."""
    return GenerateBench(
        model="m",
        batch_size=batch_size,
        prompt_tokens=8,
        new_tokens=4,
        prefill=PhaseSpeed(ours_tokens_per_s=300.0, hf_tokens_per_s=100.0),
        decode=PhaseSpeed(ours_tokens_per_s=10.0, hf_tokens_per_s=20.0),
        same_tokens=True,
        hf_experts_implementation="grouped_mm",
        ours_calls_per_step=100,
        hf_calls_per_step=200,
        bound=predict_decode(get_preset("demo"), 1e10, batch=batch_size),
        stolen_cpu=stolen_cpu,
    )


def test_to_dict_has_the_json_keys_and_ratios():
    data = _result().to_dict()
    assert list(data) == KEYS
    assert data["ours_prefill_tokens_per_s"] == 300.0 and data["hf_decode_tokens_per_s"] == 20.0
    assert data["prefill_ours_over_hf"] == 3.0 and data["decode_ours_over_hf"] == 0.5
    assert data["decode_fraction_of_bound"] == 10.0 / data["bound"]["predicted_tokens_per_s"]


def test_speeds_run_between_at_the_start_of_every_round_untimed():
    from moekit.bench.generate import _speeds

    order = []

    def ours(n):
        order.append(n)
        return [[0] * n]

    prefill, decode = _speeds(
        {"ours": ours}, 4, 3, prompt_total=8, decode_total=3, between=lambda: order.append("read")
    )
    assert order == ["read", 1, 4] * 3
    assert set(prefill) == set(decode) == {"ours"}


@pytest.mark.parametrize("streams", [False, True])
def test_the_bound_reads_bandwidth_between_rounds_only_when_a_step_outreads_the_reader(
    tiny_model_dir, monkeypatch, streams
):
    """A step that reads more than the bandwidth reader is bounded by reads taken between its
    rounds too (the highest of all); a smaller model's rounds are left alone."""
    import moekit.bench.generate as gen

    # The largest read comes second: between the rounds where they are read, else after them.
    reads = iter([1e9, 9e9, 2e9, 3e9, 4e9])
    got = []

    def measure():
        got.append(next(reads))
        return got[-1]

    monkeypatch.setattr(gen, "measure_bandwidth", measure)
    if streams:
        monkeypatch.setattr(gen, "READER_BYTES", 0)
    result = gen.bench_generate(
        tiny_model_dir, prompt_tokens=8, new_tokens=4, repeats=3, compile=False
    )
    assert len(got) == (3 + 1 if streams else 2)  # each round's or one before; one after
    assert result.bound.bandwidth == 9e9


@pytest.mark.parametrize("stolen", [None, 0.0, 0.029, 0.05])
def test_the_report_says_when_the_hypervisor_took_enough_to_disturb_it(capsys, stolen):
    from moekit.cli.bench import STOLEN_WARN, print_generate

    result = _result(batch_size=1, stolen_cpu=stolen)
    print_generate(result)
    out = capsys.readouterr().out
    assert "ours decodes at" in out
    warned = stolen is not None and stolen >= STOLEN_WARN
    assert ("the hypervisor gave 5% of this machine's CPU time" in out) == warned
