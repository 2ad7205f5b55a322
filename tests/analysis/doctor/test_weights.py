"""The checks on the stored weights: experts that are copies or zeros, and routers stored
in low precision."""

from __future__ import annotations

import pytest
import torch

from moekit.config import ModelConfig
from moekit.model_dir import save_model

from ._fixtures import FAST, add_selection_bias, checks_of, copy_expert, copy_model, edit_weights

# ---- 8. experts that are copies, or zeros --------------------------------------------------------


def test_duplicated_experts_are_a_warning(model):
    def duplicate(state: dict[str, torch.Tensor]) -> None:
        copy_expert(state, layer=1, src=0, dst=5)
        copy_expert(state, layer=1, src=0, dst=6)

    edit_weights(model, duplicate)
    check = checks_of(model, **FAST)["expert_copies"]
    assert check.status == "warning", check.evidence
    assert check.data["copies"] == {"1": [[0, 5, 6]]}
    assert "layer 1: experts 0 = 5 = 6" in check.evidence


def test_an_expert_sharing_one_projection_only_is_not_a_copy(model):
    edit_weights(
        model, lambda s: s["layers.0.ffn.experts.w_up"][3].copy_(s["layers.0.ffn.experts.w_up"][4])
    )
    assert checks_of(model, **FAST)["expert_copies"].status == "ok"


def test_an_all_zero_expert_is_a_problem(model):
    edit_weights(model, lambda s: s["layers.0.ffn.experts.w_down"][2].zero_())
    check = checks_of(model, **FAST)["expert_copies"]
    assert check.status == "problem", check.evidence
    assert check.data["zero"] == {"0": {"2": ["w_down"]}}
    assert "layer 0: expert 2 (w_down)" in check.evidence


def test_an_upcycled_model_without_noise_is_flagged(tmp_path, tiny_model_dir):
    from moekit import build_model
    from moekit.finetune.upcycle import upcycle

    dense_cfg = ModelConfig.load(tiny_model_dir).to_dict()
    dense_cfg["moe"] = None
    dense = ModelConfig.from_dict(dense_cfg)
    dense_dir = copy_model(tiny_model_dir, tmp_path / "dense")
    save_model(build_model(dense, seed=0), dense, dense_dir)
    upcycle(dense_dir, tmp_path / "moe", num_experts=4, top_k=2)
    check = checks_of(tmp_path / "moe", **FAST)["expert_copies"]
    assert check.status == "warning" and check.data["copies"] == {"0": [[0, 1, 2, 3]],
                                                                   "1": [[0, 1, 2, 3]]}  # fmt: skip
    upcycle(dense_dir, tmp_path / "noisy", num_experts=4, top_k=2, noise=0.01)
    assert checks_of(tmp_path / "noisy", **FAST)["expert_copies"].status == "ok"


# ---- 9. routers in low precision -----------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_router_stored_in_low_precision_is_a_problem(model, dtype):
    def cast(state: dict[str, torch.Tensor]) -> None:
        state["layers.1.ffn.router.weight"] = state["layers.1.ffn.router.weight"].to(dtype)

    edit_weights(model, cast)
    check = checks_of(model, **FAST)["router_precision"]
    assert check.status == "problem", check.evidence
    name = "BF16" if dtype == torch.bfloat16 else "F16"
    assert check.data["low_precision"] == {"layers.1.ffn.router.weight": name}
    assert f"layers.1.ffn.router.weight ({name})" in check.evidence


def test_a_selection_bias_stored_in_bf16_is_a_problem(model):
    add_selection_bias(model, {0: torch.full((8,), 0.01).bfloat16()})
    check = checks_of(model, **FAST)["router_precision"]
    assert check.status == "problem"
    assert check.data["low_precision"] == {"layers.0.ffn.router.selection_bias": "BF16"}


def test_router_logits_computed_in_low_precision_are_a_problem(model, monkeypatch):
    from moekit.moe.router import Router

    original = Router._logits
    monkeypatch.setattr(Router, "_logits", lambda self, x: original(self, x).bfloat16())
    check = checks_of(model, **FAST)["router_precision"]
    assert check.status == "problem", check.evidence
    assert check.data["logits_dtypes"] == ["bfloat16"]
    assert "router logits were computed in bfloat16" in check.evidence
