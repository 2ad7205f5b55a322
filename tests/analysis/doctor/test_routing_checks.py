"""The checks on the routing sample: a dead, a nearly dead expert, an imbalance and a
collapsed router, each planted in a small model (or a hand-made sample) and caught."""

from __future__ import annotations

import pytest
import torch

from moekit.analysis.doctor.routing_checks import check_dead_experts, check_imbalance
from moekit.analysis.doctor.sample import RoutingSample
from moekit.analysis.routing import load_stats
from moekit.config import ModelConfig

from ._fixtures import add_selection_bias, checks_of, edit_weights

# ---- 1. dead experts -----------------------------------------------------------------------------


def test_a_dead_expert_is_a_problem(model):
    # A fixed selection bias (as an import carries) that no token can overcome kills expert 3.
    bias = torch.zeros(8)
    bias[3] = -100.0
    add_selection_bias(model, {0: bias})
    check = checks_of(model, sample_tokens=1024)["dead_experts"]
    assert check.status == "problem", check.evidence
    assert check.data["layers"]["0"]["dead"] == [3]
    assert check.data["layers"]["1"]["dead"] == []
    assert "layer 0: expert(s) 3 got no token" in check.evidence
    assert "aux_loss_weight" in check.advice


def test_a_nearly_dead_expert_is_a_warning():
    sample = RoutingSample(tokens=4096, copies={0: [1000] * 7 + [30]}, entropy={0: 1.9},
                     logits_dtypes={"float32"}, top_k=2)  # fmt: skip
    check = check_dead_experts(sample, dead_share=0.1)
    assert check.status == "warning"
    assert check.data["layers"]["0"]["nearly_dead"] == [7]
    assert "expert 7 got 3% of an even share" in check.evidence
    assert check_dead_experts(sample, dead_share=0.02).status == "ok"


# ---- 2. load imbalance ---------------------------------------------------------------------------


def test_one_expert_taking_every_token_is_a_problem(model):
    bias = torch.zeros(8)
    bias[0] = 100.0  # every token picks expert 0 (and one other): 4x an even share
    add_selection_bias(model, {1: bias})
    check = checks_of(model, sample_tokens=1024)["load_imbalance"]
    assert check.status == "problem", check.evidence
    assert check.data["layers"]["1"]["imbalance"] == pytest.approx(4.0)
    assert check.data["layers"]["1"]["heaviest_expert"] == 0
    assert check.data["layers"]["0"]["imbalance"] < 2.0
    assert "worst: layer 1, expert 0 takes 4.00x" in check.evidence


def test_a_moderate_imbalance_is_a_warning():
    cfg = ModelConfig.from_dict(
        dict(vocab_size=64, dim=16, num_layers=1, num_heads=2,
             moe=dict(num_experts=4, top_k=1, expert_hidden=16))
    )  # fmt: skip
    sample = RoutingSample(tokens=1000, copies={0: [625, 125, 125, 125]}, entropy={0: 1.0},
                     logits_dtypes={"float32"}, top_k=1)  # fmt: skip
    assert check_imbalance(sample, cfg, 2.0, 3.0).status == "warning"  # 2.5x
    assert check_imbalance(sample, cfg, 2.0, 2.4).status == "problem"
    assert check_imbalance(sample, cfg, 2.6, 3.0).status == "ok"


# ---- 3. router collapse --------------------------------------------------------------------------


def test_a_saturated_router_is_a_collapse(model):
    # Router weights of enormous norm: each token's softmax is one-hot.
    edit_weights(model, lambda s: s["layers.0.ffn.router.weight"].mul_(1e4))
    check = checks_of(model, sample_tokens=1024)["router_collapse"]
    assert check.status == "problem", check.evidence
    assert check.data["layers"]["0"]["normalised_entropy"] < 0.01
    assert check.data["layers"]["1"]["normalised_entropy"] > 0.9
    assert "layer 0" in check.evidence and "layer 1" not in check.evidence


def test_the_doctor_and_analyze_agree_on_dead_and_nearly_dead_experts():
    copies = [1000, 1000, 1000, 1000, 1000, 1000, 30, 0]
    sample = RoutingSample(tokens=3015, copies={0: copies}, entropy={0: 1.9},
                           logits_dtypes={"float32"}, top_k=2)  # fmt: skip
    layer = check_dead_experts(sample, dead_share=0.1).data["layers"]["0"]
    stats = load_stats(torch.tensor(copies), 0.1)
    assert layer["dead"] == stats.dead == [7]
    assert layer["nearly_dead"] == stats.dying == [6] and stats.nearly_dead == [6, 7]
