"""`moekit compare-routing` end to end through `main`: JSON, the table, and bad input as one
line with exit status 2."""

import json
import shutil

from moekit import build_model
from moekit.cli import main
from moekit.config import ModelConfig
from moekit.data.tokenizer import Tokenizer
from moekit.model_dir import ModelDir, save_model


def test_compare_routing_command(tiny_model_dir, tmp_path, capsys):
    copy = tmp_path / "copy"
    shutil.copytree(tiny_model_dir, copy)
    argv = ["compare-routing", str(tiny_model_dir), str(copy), "--tokens", "256", "--quiet"]
    assert main([*argv, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["tokens"] == 256 and result["first_divergent_layer"] is None
    assert [row["set_match"] for row in result["layers"]] == [1.0, 1.0]
    assert set(result["measures"]) >= {"set_match", "overlap", "top1", "near_ties"}
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "no layer diverges" in out and "same set" in out


def test_compare_routing_refuses_bad_input_in_one_line(tiny_model_dir, tmp_path, capsys):
    cfg = ModelDir(tiny_model_dir).config().to_dict()
    cfg["moe"]["top_k"] = 3
    other = ModelConfig.from_dict(cfg)
    Tokenizer.load(tiny_model_dir).save(tmp_path / "k3")
    save_model(build_model(other, seed=0), other, tmp_path / "k3")
    assert main(["compare-routing", str(tiny_model_dir), str(tmp_path / "k3")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("moekit compare-routing: error:") and "\n" not in err
    assert "experts per token 2 in A, 3 in B" in err
    assert main(["compare-routing", str(tiny_model_dir), str(tiny_model_dir), "--tokens", "0"]) == 2
    assert "tokens=0" in capsys.readouterr().err
    assert main(["compare-routing", str(tiny_model_dir), str(tmp_path / "missing")]) == 2
    assert "B:" in capsys.readouterr().err
