"""`moekit generate --speculative`: the same greedy text as without it; clear errors."""

import json
import shutil

import pytest

from moekit import build_model
from moekit.config import ModelConfig
from moekit.data.tokenizer import Tokenizer
from moekit.model_dir import save_model

from .conftest import run

PROMPT = "one two three one two three one"


def small_model(out, vocab=512):
    cfg = ModelConfig.from_dict(
        dict(vocab_size=vocab, dim=32, num_layers=1, num_heads=2, num_kv_heads=2, ffn_hidden=64,
             max_seq_len=128, moe=dict(num_experts=4, top_k=1, expert_hidden=32))
    )  # fmt: skip
    save_model(build_model(cfg, seed=3), cfg, out)
    return out


@pytest.fixture(scope="module")
def draft_dir(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("draft")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_model_dir / name, out / name)
    return small_model(out)


def generate(model_dir, *flags):
    args = ["generate", str(model_dir), PROMPT, "--temperature", "0", "--max-new-tokens", "24"]
    return json.loads(run(*args, "--json", "--device", "cpu", *flags).stdout)


def test_speculative_generation_gives_the_plain_greedy_text(tiny_model_dir, draft_dir):
    plain = generate(tiny_model_dir)
    assert generate(tiny_model_dir, "--speculative", "ngram") == plain
    draft = generate(
        tiny_model_dir,
        "--speculative",
        "draft",
        "--draft",
        str(draft_dir),
        "--num-draft-tokens",
        "3",
    )
    assert draft == plain


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--draft", "x"], "--draft MODEL_DIR needs --speculative draft"),
        (["--speculative", "draft"], "--speculative draft needs --draft MODEL_DIR"),
        (["--speculative", "ngram", "--draft", "x"], "--draft is for --speculative draft"),
        (["--speculative", "ngram", "--num-draft-tokens", "0"], "--num-draft-tokens 0 is out of"),
        (["--speculative", "draft", "--draft", "/nonexistent"], "is not a model directory"),
    ],
)
def test_bad_speculative_flags_are_named(tiny_model_dir, flags, message):
    proc = run("generate", str(tiny_model_dir), "hi", "--device", "cpu", *flags, check=False)
    assert proc.returncode != 0
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_draft_model_with_another_tokenizer_is_named(tiny_model_dir, tmp_path):
    Tokenizer.train(["quite another text for another vocabulary"] * 3, 300).save(tmp_path)
    small_model(tmp_path)
    flags = ["--speculative", "draft", "--draft", str(tmp_path)]
    proc = run("generate", str(tiny_model_dir), "hi", "--device", "cpu", *flags, check=False)
    assert proc.returncode != 0
    assert f"the draft model {str(tmp_path)!r} has another tokenizer" in proc.stderr
    assert "Traceback" not in proc.stderr
