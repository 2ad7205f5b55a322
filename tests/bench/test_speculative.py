"""`moekit bench generate --speculative`: both sides agree, and the counts make sense."""

import json

import pytest

from moekit.bench.speculative import bench_speculative
from moekit.cli.commands import main
from moekit.infer.speculative import SpeculativeConfig


def test_bench_speculative_measures_both_sides(tiny_model_dir):
    r = bench_speculative(
        tiny_model_dir,
        config=SpeculativeConfig(method="ngram", num_draft_tokens=3),
        prompt_tokens=48,
        new_tokens=16,
        repeats=1,
    )
    assert r.same_tokens
    assert r.prompt == "builtin corpus text" and r.prompt_tokens == 48
    assert r.plain_tokens_per_s > 0 and r.speculative_tokens_per_s > 0
    assert 0.0 <= r.acceptance_rate <= 1.0
    assert r.tokens_per_pass >= 1.0
    # The tiny model routes each token to 2 of 8 experts; a verify pass of up to 4 tokens
    # touches at least as many and at most 8.
    assert r.num_experts == 8 and r.experts_single == 2.0
    assert 2.0 <= r.experts_verify <= 8.0
    assert r.decode_pass_s > 0 and r.verify_pass_s > 0
    assert json.loads(json.dumps(r.to_dict()))["speedup"] == pytest.approx(r.speedup)


def test_bench_generate_speculative_from_the_command_line(tiny_model_dir, tmp_path, capsys):
    argv = ["bench", "generate", str(tiny_model_dir), "--speculative", "draft", "--draft"]
    argv += [str(tiny_model_dir), "--prompt-tokens", "32", "--new-tokens", "8", "--repeats", "1"]
    assert main([*argv, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["same_tokens"] is True
    assert data["acceptance_rate"] == 1.0  # the model drafting for itself
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "distinct experts per MoE layer: 2.00 for one token" in out
    assert "one forward pass: " in out


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--draft", "DIR"], "--draft MODEL_DIR needs --speculative draft"),
        (["--speculative", "ngram", "--max-memory", "1GB"], "leave out --max-memory"),
        (["--speculative", "ngram", "--batch-size", "2"], "leave out --batch-size"),
        (["--speculative", "ngram", "--num-draft-tokens", "17"], "--num-draft-tokens 17 is out"),
    ],
)
def test_bench_speculative_flags_are_checked(tiny_model_dir, capsys, flags, message):
    argv = ["bench", "generate", str(tiny_model_dir), *flags]
    assert main([a.replace("DIR", str(tiny_model_dir)) for a in argv]) != 0
    assert message in capsys.readouterr().err
