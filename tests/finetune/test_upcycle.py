import json

import pytest
import torch

from moekit import build_model
from moekit.cli import main
from moekit.config import ModelConfig
from moekit.finetune.upcycle import upcycle
from moekit.model_dir import load_model, save_model
from moekit.params import count_params

DENSE = dict(vocab_size=64, dim=32, num_layers=2, num_heads=4, num_kv_heads=2, ffn_hidden=48,
             max_seq_len=64)  # fmt: skip


@pytest.fixture
def dense_dir(tmp_path):
    cfg = ModelConfig.from_dict(DENSE)
    model = build_model(cfg, seed=3)
    out = tmp_path / "dense"
    save_model(model, cfg, out)
    return out


def logits(directory, tokens):
    model = load_model(directory).eval()
    with torch.no_grad():
        return model(tokens).logits


@pytest.mark.parametrize("experts,top_k", [(4, 2), (8, 1), (8, 3)])
def test_upcycled_model_computes_the_dense_function(tmp_path, dense_dir, experts, top_k):
    cfg = upcycle(dense_dir, tmp_path / "moe", num_experts=experts, top_k=top_k, seed=1)
    assert cfg.moe.num_experts == experts and cfg.moe.top_k == top_k
    assert cfg.moe.expert_hidden == 48
    tokens = torch.randint(0, 64, (2, 16))
    torch.testing.assert_close(logits(tmp_path / "moe", tokens), logits(dense_dir, tokens),
                               rtol=1e-5, atol=1e-5)  # fmt: skip
    # The router is fresh, not zero: tokens do spread over the experts.
    model = load_model(tmp_path / "moe")
    with torch.no_grad():
        routed = model(tokens, return_routing=True).moe_stats[0].routing.experts
    assert len(routed.unique()) > top_k


def test_noise_breaks_the_symmetry_and_granularity_splits_experts(tmp_path, dense_dir):
    tokens = torch.randint(0, 64, (2, 16))
    upcycle(dense_dir, tmp_path / "noisy", num_experts=4, top_k=2, noise=0.05)
    noisy = load_model(tmp_path / "noisy").moe_layers()[0].experts.w_up
    assert not torch.equal(noisy[0], noisy[1])
    difference = (logits(tmp_path / "noisy", tokens) - logits(dense_dir, tokens)).abs().max()
    assert 0 < difference < 0.5
    cfg = upcycle(dense_dir, tmp_path / "fine", num_experts=8, top_k=4, granularity=2)
    assert cfg.moe.expert_hidden == 24
    fine = load_model(tmp_path / "fine").moe_layers()[0].experts
    dense = load_model(dense_dir).blocks()[0].ffn
    # Expert 2e + s is slice s of the dense MLP; down projections scaled by the granularity.
    torch.testing.assert_close(fine.w_up[1], dense.w_up.weight[24:])
    torch.testing.assert_close(fine.w_down[2], dense.w_down.weight[:, :24] * 2)


def test_invalid_upcycling_is_refused(tmp_path, dense_dir):
    with pytest.raises(ValueError, match="granularity=3"):
        upcycle(dense_dir, tmp_path / "x", num_experts=8, granularity=3)
    with pytest.raises(ValueError, match="noise"):
        upcycle(dense_dir, tmp_path / "x", num_experts=8, noise=-1.0)
    upcycle(dense_dir, tmp_path / "moe", num_experts=4)
    with pytest.raises(ValueError, match="already a Mixture-of-Experts"):
        upcycle(tmp_path / "moe", tmp_path / "y", num_experts=4)
    with pytest.raises(ValueError, match="top_k"):
        upcycle(dense_dir, tmp_path / "z", num_experts=4, top_k=5)


def test_upcycle_cli(tmp_path, dense_dir, capsys):
    assert main(["upcycle", str(dense_dir), "--experts", "4", "--top-k", "2",
                 "--out", str(tmp_path / "moe"), "--json"]) == 0  # fmt: skip
    figures = json.loads(capsys.readouterr().out)
    cfg = ModelConfig.load(tmp_path / "moe")
    assert (
        figures["total_params"]
        == count_params(cfg).total
        > count_params(ModelConfig.from_dict(DENSE)).total
    )
    assert figures["active_params"] == count_params(cfg).active


def test_layer_placement_keeps_dense_layers(tmp_path, dense_dir):
    cfg = upcycle(dense_dir, tmp_path / "moe", num_experts=4, top_k=2, first_dense_layers=1)
    assert cfg.moe_layers == [1]
    tokens = torch.randint(0, 64, (2, 16))
    torch.testing.assert_close(logits(tmp_path / "moe", tokens), logits(dense_dir, tokens),
                               rtol=1e-5, atol=1e-5)  # fmt: skip
    with pytest.raises(ValueError, match="leaves no MoE layer"):
        upcycle(dense_dir, tmp_path / "none", num_experts=4, first_dense_layers=2)
    cfg = upcycle(dense_dir, tmp_path / "listed", num_experts=4, top_k=2, dense_layers=[0])
    assert cfg.moe_layers == [1] and cfg.moe.dense_layers == [0]
    with pytest.raises(ValueError, match=r"dense_layers=\[0, 1\] leaves no MoE layer"):
        upcycle(dense_dir, tmp_path / "none", num_experts=4, dense_layers=[0, 1])


def test_an_existing_model_is_never_overwritten(tmp_path, dense_dir):
    with pytest.raises(ValueError, match="already holds a model"):
        upcycle(dense_dir, dense_dir, num_experts=4)
    upcycle(dense_dir, tmp_path / "moe", num_experts=4)
    before = (tmp_path / "moe" / "model.safetensors").read_bytes()
    with pytest.raises(ValueError, match="already holds a model"):
        upcycle(dense_dir, tmp_path / "moe", num_experts=8)
    assert (tmp_path / "moe" / "model.safetensors").read_bytes() == before
