"""Experts added and recycled during pre-training (train.grow, train.recycle_dead_every): the
model grows at the scheduled steps, the optimizer's moments move with the weights, and a run
resumed across an edit continues exactly."""

import pytest
import torch

from moekit.config import ModelConfig
from moekit.model_dir import ModelDir, load_weights
from moekit.training.checkpoint import latest_checkpoint
from moekit.training.grow import (
    ExpertGrowth,
    GrowEvent,
    apply_plan,
    config_at,
    load_moments,
    parse_grow,
)
from moekit.training.optim import build_optimizer
from moekit.training.trainer import train


def losses(run_dir):
    return [r["loss"] for r in ModelDir(run_dir).read_metrics() if r["kind"] == "train"]


def test_grow_specs_parse_and_bad_ones_are_named():
    assert parse_grow(["6:split=0,2", "3:add=1"]) == [
        GrowEvent(3, add=1),
        GrowEvent(6, split=(0, 2)),
    ]
    for bad in ("3:add=0", "0:add=1", "x:add=1", "3:grow=1", "3:split=a"):
        with pytest.raises(ValueError, match=r"train.grow: .* is invalid"):
            parse_grow([bad])
    with pytest.raises(ValueError, match="two events at one step"):
        parse_grow(["3:add=1", "3:split=0"])


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (['train.grow=["2:split=7"]'], r"splits \[7\]: give distinct experts of the 4"),
        (['train.grow=["2:add=5"]'], "adds 5 copies of the busiest of 4"),
        (['train.grow=["2:add=1"]', "model.moe.num_groups=2", "model.moe.topk_groups=1"],
         "makes 5 experts, which num_groups=2 does not divide"),
        (['train.grow=["2:add=1"]', "model.moe=null"], "needs a model with experts"),
        (['train.grow=["2:add=1"]', "model.moe.router=hierarchical", "model.moe.router_groups=2",
          "model.moe.group_top_k=1"], "step 2: adding 1 experts is invalid: each of the 2 expert"),
        (['train.grow=["2:add=2","4:split=0,1"]', "model.moe.router=hierarchical",
          "model.moe.router_groups=2", "model.moe.group_top_k=1"],
         r"step 4: splitting experts \[0, 1\] gives the 2 expert groups unequal"),
    ],
)  # fmt: skip
def test_schedules_that_cannot_work_are_refused_before_training(tiny_run_config, extra, message):
    with pytest.raises(ValueError, match=message):
        tiny_run_config("train.max_steps=4", *extra)


def test_a_grown_run_resumes_exactly_across_the_edit(tmp_path, tiny_run_config, capsys):
    cfg = tiny_run_config("train.max_steps=8", 'train.grow=["3:add=2","5:split=0"]',
                          "train.save_every=4")  # fmt: skip
    train(cfg, tmp_path / "full", verbose=True, report=False)
    out = "".join(capsys.readouterr())
    assert "step 3: added copies of experts" in out and "6 experts per MoE layer" in out
    assert "step 5: split experts [0]; 7 experts per MoE layer" in out
    assert ModelDir(tmp_path / "full").config().moe.num_experts == 7
    assert config_at(cfg.model, parse_grow(cfg.train.grow), 4).moe.num_experts == 6
    # stopped after the first edit, resumed: the same losses and weights, bit for bit
    train(cfg, tmp_path / "split", verbose=False, report=False, stop_after=4)
    assert latest_checkpoint(tmp_path / "split").step == 4
    assert ModelDir(tmp_path / "split").config().moe.num_experts == 6
    train(cfg, tmp_path / "split", verbose=False, report=False, resume=True)
    assert losses(tmp_path / "full") == losses(tmp_path / "split")
    a, b = load_weights(tmp_path / "full"), load_weights(tmp_path / "split")
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert a["layers.0.ffn.router.weight"].shape[0] == 7


def test_the_moments_move_with_the_weights(tiny_run_config):
    from moekit import build_model

    cfg = tiny_run_config("train.max_steps=4")
    model = build_model(cfg.model, seed=0)
    optimizer = build_optimizer(model, cfg.train)
    model(torch.randint(0, 512, (2, 8))).logits.sum().backward()
    optimizer.step()
    growth = ExpertGrowth([GrowEvent(1, split=(2,))], 0, 0.1)
    _, plan = growth.plan_at(1, model.cfg)
    new_cfg, weights, moments = apply_plan(model, optimizer, plan, noise=0.0, seed=0)
    grown = build_model(new_cfg)
    grown.load_state_dict(weights)
    fresh = build_optimizer(grown, cfg.train)
    load_moments(grown, fresh, moments)
    name = "layers.1.ffn.experts.w_up"
    old = optimizer.state[dict(model.named_parameters())[name]]["exp_avg"]
    new = fresh.state[dict(grown.named_parameters())[name]]["exp_avg"]
    assert new.shape[0] == 5 and torch.equal(new[:4], old) and torch.equal(new[4], old[2])
    assert torch.equal(weights[name][4], weights[name][2])


def test_dead_experts_are_recycled_as_copies_of_busy_ones():
    cfg = ModelConfig.from_dict(dict(vocab_size=64, dim=32, num_layers=2, num_heads=4,
                                     num_kv_heads=2, ffn_hidden=48, max_seq_len=64,
                                     moe=dict(num_experts=4, top_k=1, expert_hidden=16)))  # fmt: skip
    growth = ExpertGrowth([], recycle_every=5, recycle_below=0.25)
    for layer in cfg.moe_layers:
        growth.observe(layer, torch.tensor([50, 1, 40, 30]))  # fair share 30: expert 1 is dead
    assert growth.plan_at(4, cfg) is None  # not due yet
    line, plan = growth.plan_at(5, cfg)
    assert "recycled dead experts" in line
    assert [s.ids[0] for s in plan[0]] == [0, 0, 2, 3] and plan[0][1].copy
    assert growth.counts == {}  # a fresh window
    for layer in cfg.moe_layers:
        growth.observe(layer, torch.tensor([10, 10, 10, 10]))
    assert growth.plan_at(10, cfg) is None  # none dead: nothing to do


def test_recycling_during_a_run(tmp_path, tiny_run_config):
    cfg = tiny_run_config("train.max_steps=4", "train.recycle_dead_every=2",
                          "train.recycle_dead_below=0.9")  # fmt: skip
    train(cfg, tmp_path / "run", verbose=False, report=False)
    assert ModelDir(tmp_path / "run").config().moe.num_experts == 4
    assert len(losses(tmp_path / "run")) == 4


HIER = ["model.moe.router=hierarchical", "model.moe.router_groups=2", "model.moe.group_top_k=1",
        "model.moe.group_bias_update_rate=1e-3", "model.moe.bias_update_rate=1e-3"]  # fmt: skip


def test_a_grown_hierarchical_run_keeps_its_groups_and_resumes_exactly(tmp_path, tiny_run_config):
    cfg = tiny_run_config("train.max_steps=8", 'train.grow=["3:add=2","5:split=0,5"]',
                          "train.save_every=4", *HIER)  # fmt: skip
    train(cfg, tmp_path / "full", verbose=False, report=False)
    grown = ModelDir(tmp_path / "full").config().moe
    assert grown.num_experts == 8 and grown.router_groups == 2  # 2 groups of 2 -> 3 -> 4
    train(cfg, tmp_path / "split", verbose=False, report=False, stop_after=4)
    assert ModelDir(tmp_path / "split").config().moe.num_experts == 6
    train(cfg, tmp_path / "split", verbose=False, report=False, resume=True)
    assert losses(tmp_path / "full") == losses(tmp_path / "split")
    a, b = load_weights(tmp_path / "full"), load_weights(tmp_path / "split")
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert a["layers.0.ffn.router.weight"].shape[0] == 8
    assert a["layers.0.ffn.router.group_weight"].shape[0] == 2


def test_a_hierarchical_model_grows_and_recycles_inside_each_group(tiny_run_config):
    cfg = tiny_run_config("model.moe.num_experts=8", *HIER).model  # 2 groups of 4
    growth = ExpertGrowth([GrowEvent(3, add=2)], recycle_every=5, recycle_below=0.25)
    for layer in cfg.moe_layers:
        growth.observe(layer, torch.tensor([5, 40, 30, 20, 0, 0, 9, 1]))
    line, plan = growth.plan_at(3, cfg)  # the busiest of each group, copied into it
    assert "10 experts per MoE layer" in line
    assert [s.ids[0] for s in plan[0]] == [0, 1, 2, 3, 1, 4, 5, 6, 7, 6]
    for layer in cfg.moe_layers:  # fair share 100 / 8: experts 0, 4, 5 and 7 are dead
        growth.observe(layer, torch.tensor([1, 40, 30, 20, 0, 0, 9, 0]))
    line, plan = growth.plan_at(5, cfg)
    assert "recycled dead experts {0: [0, 4, 5, 7]" in line
    assert [s.ids[0] for s in plan[0]] == [1, 1, 2, 3, 6, 6, 6, 6]  # each from its own group
    for layer in cfg.moe_layers:  # group 1 has no live expert: nothing to copy there
        growth.observe(layer, torch.tensor([1, 40, 30, 20, 0, 0, 0, 0]))
    line, plan = growth.plan_at(10, cfg)
    assert "{0: [0], 1: [0]}" in line and [s.ids[0] for s in plan[0]][4:] == [4, 5, 6, 7]


def test_recycling_a_hierarchical_run(tmp_path, tiny_run_config):
    cfg = tiny_run_config("train.max_steps=4", "train.recycle_dead_every=2",
                          "train.recycle_dead_below=0.9", *HIER)  # fmt: skip
    train(cfg, tmp_path / "run", verbose=False, report=False)
    assert ModelDir(tmp_path / "run").config().moe.num_experts == 4
    assert len(losses(tmp_path / "run")) == 4
