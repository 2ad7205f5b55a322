import json

import pytest

from moekit.params import count_params
from moekit.presets import get_preset
from moekit.training.compare import compare, dense_with_params


@pytest.mark.parametrize("preset", ["tiny", "demo", "small"])
def test_dense_twin_matches_the_active_count(preset):
    cfg = get_preset(preset)
    target = count_params(cfg).active
    dense = dense_with_params(cfg, target)
    assert dense.moe is None
    assert dense.dim == cfg.dim and dense.num_layers == cfg.num_layers
    per_unit = 3 * cfg.dim * cfg.num_layers
    assert abs(count_params(dense).total - target) <= per_unit / 2


def test_compare_trains_both_on_the_same_data(tmp_path, tiny_run_config):
    cfg = tiny_run_config("train.max_steps=4", "train.eval_every=2")
    result = compare(cfg, tmp_path, dense_total=True, verbose=False)
    assert set(result.runs) == {"moe", "dense_active", "dense_total"}
    moe, dense = result.runs["moe"], result.runs["dense_active"]
    assert moe.tokens == dense.tokens == 4 * 4 * 32
    assert abs(dense.active_params - moe.active_params) < 0.02 * moe.active_params
    big = result.runs["dense_total"]
    assert abs(big.total_params - moe.total_params) < 0.02 * moe.total_params
    assert result.moe_val_loss == moe.val_loss and result.dense_val_loss == dense.val_loss
    assert result.dense_total_val_loss == big.val_loss
    assert [p.tokens for p in moe.curve] == [256, 512]
    assert (tmp_path / "compare.png").stat().st_size > 0
    summary = result.to_dict()
    assert json.loads((tmp_path / "compare.json").read_text()) == summary
    # compare.json keeps its layout: the headline losses, then every run's figures.
    assert list(summary) == ["moe_val_loss", "dense_val_loss", "runs", "dense_total_val_loss"]
    assert summary["runs"]["moe"]["curve"][0] == moe.curve[0].to_dict()
    assert set(summary["runs"]["moe"]) == {"total_params", "active_params", "ffn_hidden",
                                           "tokens", "train_seconds", "val_loss",
                                           "val_by_domain", "curve"}  # fmt: skip
    assert moe.ffn_hidden is None and dense.ffn_hidden is not None
    # The same tokenizer (trained on the same split) served every run.
    tokenizers = {(tmp_path / r / "tokenizer.json").read_text() for r in result.runs}
    assert len(tokenizers) == 1


def test_compare_needs_an_moe(tmp_path, tiny_run_config):
    with pytest.raises(ValueError, match="needs an MoE model"):
        compare(tiny_run_config("model.moe=null"), tmp_path, verbose=False)


@pytest.mark.slow
def test_compare_and_train_cli_print_json(tmp_path):
    import subprocess
    import sys

    from ..conftest import TINY_RUN

    args = ["--preset", "debug", *TINY_RUN, "train.max_steps=2", "train.eval_every=2", "--json"]
    proc = subprocess.run(
        [sys.executable, "-m", "moekit.cli", "compare", "--out", str(tmp_path / "cmp"), *args],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert isinstance(data["moe_val_loss"], float) and isinstance(data["dense_val_loss"], float)
    proc = subprocess.run(
        [sys.executable, "-m", "moekit.cli", "train", "--out", str(tmp_path / "run"), *args],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["steps"] == 2
