"""Random weights written quantised one block at a time (`moekit quantize --preset`)."""

import json

import pytest
import torch

from moekit import build_model
from moekit.cli.commands import main
from moekit.config import ModelConfig
from moekit.infer.offload import OffloadConfig, load_paged_model
from moekit.model import random_tensors
from moekit.model_dir import ModelDir, load_model

CONFIG = {
    "vocab_size": 300, "dim": 64, "num_layers": 3, "num_heads": 4, "num_kv_heads": 2,
    "max_seq_len": 64, "ffn_hidden": 96, "tie_embeddings": True,
    "moe": {"num_experts": 6, "top_k": 2, "expert_hidden": 64, "num_shared_experts": 1,
            "shared_expert_gate": True, "first_dense_layers": 1, "selection_bias": True},
}  # fmt: skip


def test_random_tensors_are_the_built_models_weights():
    """Made piece by piece, drawn in the same order: the same numbers as `build_model`."""
    cfg = ModelConfig.from_dict(CONFIG)
    want = build_model(cfg, seed=5).state_dict()
    got = dict(random_tensors(cfg, seed=5))
    assert list(got) == list(want)  # every tensor, in state-dict order
    for name, w in want.items():
        assert got[name].dtype == w.dtype and torch.equal(got[name], w), name
    assert not torch.equal(dict(random_tensors(cfg, seed=6))["embed.weight"], want["embed.weight"])


def test_quantize_preset_writes_a_random_quantised_model_that_generates(tmp_path, capsys):
    out = tmp_path / "q"
    args = ["quantize", "--preset", "tiny", "--bits", "4", "--only", "all", "--seed", "3"]
    assert main([*args, "--out", str(out), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["bits"] == 4 and result["tensors_quantized"] > 0
    assert ModelDir(out).config().quantization is not None
    model = load_model(out).eval()
    ids = torch.randint(0, model.cfg.vocab_size, (1, 12))
    with torch.no_grad():
        logits = model(ids, causal_routing=True).logits
        assert torch.isfinite(logits).all() and logits.std() > 0
        paged = load_paged_model(out, OffloadConfig(max_memory=1 << 40)).eval()
        assert torch.equal(paged(ids, causal_routing=True).logits, logits)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["MODEL", "--preset", "tiny"], "name a model directory or --preset NAME"),
        ([], "name a model directory or --preset NAME"),
        (["--preset", "nope"], "unknown preset 'nope'; available presets: "),
    ],
)
def test_quantize_names_its_source_once(tmp_path, capsys, argv, message):
    argv = [str(tmp_path) if a == "MODEL" else a for a in argv]
    assert main(["quantize", *argv, "--bits", "8", "--out", str(tmp_path / "x")]) == 2
    assert message in capsys.readouterr().err


def test_generating_from_a_directory_without_a_tokenizer_says_what_to_use(tmp_path, capsys):
    out = tmp_path / "q"
    assert main(["quantize", "--preset", "debug", "--bits", "8", "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["generate", str(out), "Hello"]) == 2
    err = capsys.readouterr().err
    assert "no tokenizer file" in err and "moekit bench generate" in err
