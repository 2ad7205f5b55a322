"""The checks on what balances the load: an aux-loss-free bias that never moves, and no
balancing at all."""

from __future__ import annotations

import pytest
import torch

from moekit.config import ModelConfig
from moekit.model_dir import load_weights, save_model

from ._fixtures import (
    FAST,
    add_selection_bias,
    checks_of,
    copy_model,
    edit_moe_config,
    write_checkpoint,
)

# ---- 5. aux-loss-free balancing that does nothing ------------------------------------------------


def test_an_all_zero_selection_bias_is_a_problem(tmp_path, tiny_model_dir):
    cfg = ModelConfig.load(tiny_model_dir)
    data = cfg.to_dict()
    data["moe"]["bias_update_rate"] = 0.001
    cfg = ModelConfig.from_dict(data)
    out = copy_model(tiny_model_dir, tmp_path / "m")
    from moekit import build_model

    save_model(build_model(cfg, seed=0), cfg, out)  # an untouched bias: zeros
    check = checks_of(out, **FAST)["selection_bias"]
    assert check.status == "problem", check.evidence
    assert check.data["zero_layers"] == [0, 1]
    assert "all zeros" in check.evidence and "update_router_biases" in check.advice


@pytest.mark.parametrize("moved", [(), (1,), (0, 1)])
def test_a_selection_bias_unchanged_between_checkpoints_is_a_problem(model, moved):
    torch.manual_seed(1)
    biases = {0: 0.01 * torch.randn(8), 1: 0.01 * torch.randn(8)}
    add_selection_bias(model, biases, bias_update_rate=0.001)
    state = load_weights(model)
    write_checkpoint(model, 4, state)
    later = dict(state)
    for layer in moved:
        later[f"layers.{layer}.ffn.router.selection_bias"] = biases[layer] + 0.001
    write_checkpoint(model, 8, later)
    check = checks_of(model, **FAST)["selection_bias"]
    if moved == (0, 1):
        assert check.status == "ok", check.evidence
        assert "moved by up to 0.001 between step-00000004 and step-00000008" in check.evidence
        return
    assert check.status == "problem", check.evidence
    stuck = "0, 1" if not moved else "0"
    assert f"identical in checkpoints step-00000004 and step-00000008 for layer(s) {stuck}." in (
        check.evidence
    )
    assert check.data["max_change"]["0"] == 0.0


def test_a_fixed_imported_bias_is_not_checked_for_updates(model):
    add_selection_bias(model, {})  # selection_bias=True, bias_update_rate=0: nothing moves it
    check = checks_of(model, **FAST)["selection_bias"]
    assert check.status == "ok" and check.data["applicable"] is False


# ---- 6. nothing balances the load ----------------------------------------------------------------


def test_a_zero_aux_loss_weight_without_bias_balancing_is_a_problem(model):
    edit_moe_config(model, aux_loss_weight=0.0)
    check = checks_of(model, **FAST)["load_balancing"]
    assert check.status == "problem", check.evidence
    assert "aux_loss_weight is 0 with a softmax topk router" in check.evidence
    # Aux-loss-free balancing is a balancer too.
    add_selection_bias(model, {0: torch.full((8,), 0.01), 1: torch.full((8,), 0.01)},
                       bias_update_rate=0.001, selection_bias=False)  # fmt: skip
    check = checks_of(model, **FAST)["load_balancing"]
    assert check.status == "ok" and "bias_update_rate=0.001" in check.evidence


def test_a_lora_finetune_of_a_bias_balanced_model_passes(trained_run, tmp_path):
    """LoRA keeps the routers and their balancing biases frozen by design: a bias that does
    not move between the fine-tune's checkpoints is not a problem there."""
    import json

    from moekit.training.config import finetune_run_config
    from moekit.training.trainer import train

    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": f"{i} + 1 = ", "completion": str(i + 1)})
                              for i in range(24)) + "\n")  # fmt: skip
    cfg = finetune_run_config(trained_run, data, overrides=[
        "train.max_steps=4", "train.batch_size=4", "train.seq_len=32", "train.save_every=2",
        "train.eval_every=4", "train.eval_batches=1", "train.sample_tokens=2"])  # fmt: skip
    train(cfg, tmp_path / "lora", verbose=False, report=False)
    check = checks_of(tmp_path / "lora", **FAST)["selection_bias"]
    assert check.status == "ok", check.evidence
    assert check.data["frozen_by_finetune"] == "lora" and "frozen by design" in check.evidence
