"""Expert edits of a hierarchically routed model: every group gains or loses as many experts,
each new expert sits in its own group, the group router stays as it was, the joint
probabilities p(g) * p(e|g) are kept exactly where an edit copies, and what would make the
groups unequal is refused by name before anything is written."""

import json

import pytest
import torch

from moekit import build_model
from moekit.analysis.analyze import analyze
from moekit.analysis.expert_edits import ExpertEdit, plan_edit
from moekit.analysis.expert_importance import ExpertImportance
from moekit.cli import main
from moekit.config import ModelConfig
from moekit.finetune.config import LoRAConfig
from moekit.finetune.expert_edit import Source, edit_state, edited_config, split_plan, write_edited
from moekit.finetune.group_edit import (
    busiest_in_groups,
    expert_groups,
    merge_in_groups,
    prune_in_groups,
    split_in_groups,
)
from moekit.finetune.lora import adapter_state, apply_lora, load_adapter, merge_lora, save_adapter
from moekit.interop.fields import UnsupportedError
from moekit.interop.hf import export_hf
from moekit.model_dir import ModelDir, load_model, load_weights, save_model

from .conftest import digest

# 8 experts in 2 groups of 4; a token takes 1 group and 2 experts inside it.
HIER = dict(num_experts=8, top_k=2, expert_hidden=16, router="hierarchical", router_groups=2,
            group_top_k=1)  # fmt: skip
BASE = dict(vocab_size=512, dim=32, num_layers=2, num_heads=4, num_kv_heads=2, ffn_hidden=48,
            max_seq_len=64)  # fmt: skip
BIASES = dict(router_bias=True, bias_update_rate=1e-3, group_bias_update_rate=1e-3)


def make(tmp_path, name="src", tokenizer=None, **moe):
    cfg = ModelConfig.from_dict({**BASE, "moe": {**HIER, **BIASES, **moe}})
    model = build_model(cfg, seed=1)
    with torch.no_grad():  # every bias with values to follow
        for layer in model.moe_layers().values():
            for t in (layer.router.bias, layer.router.selection_bias,
                      layer.router.group_selection_bias):  # fmt: skip
                if t is not None:
                    t.copy_(torch.randn(t.shape))
    save_model(model, cfg, tmp_path / name)
    if tokenizer is not None:
        (tmp_path / name / "tokenizer.json").write_bytes(
            (tokenizer / "tokenizer.json").read_bytes()
        )
    return tmp_path / name


def joint_probs(model_dir, x):
    """Per MoE layer: the router's joint probabilities p(g) * p(e|g) (T, E) and p(g) (T, G)."""
    model = load_model(model_dir).eval()
    out = {}
    with torch.no_grad():
        for i, layer in model.moe_layers().items():
            logits = layer.router.compute_logits(x)
            out[i] = (logits.softmax(-1), layer.router.group_probs(logits))
    return out


@pytest.mark.parametrize("kind", ["add", "split"])
def test_copies_sit_in_their_group_and_keep_the_joint_probabilities(tmp_path, kind):
    src = make(tmp_path)
    cfg, state = ModelDir(src).config(), load_weights(src)
    groups = expert_groups(cfg.moe)
    if kind == "add":
        freq = {layer: torch.tensor([1, 9, 3, 8, 7, 2, 6, 5]) for layer in cfg.moe_layers}
        ids = busiest_in_groups(freq, 4, groups)
        assert ids[0] == [1, 3, 4, 6]  # the 2 busiest of each group, not of the layer
        origin = [0, 1, 2, 3, 1, 3, 4, 5, 6, 7, 4, 6]
    else:
        ids = {layer: [5, 2] for layer in cfg.moe_layers}
        origin = [0, 1, 2, 3, 2, 4, 5, 6, 7, 5]
    plan = split_in_groups(cfg.moe_layers, groups, ids)
    assert [s.ids[0] for s in plan[0]] == origin
    write_edited(src, tmp_path / "out", plan)
    new_cfg = ModelDir(tmp_path / "out").config()
    assert new_cfg.moe.num_experts == len(origin) and new_cfg.moe.router_groups == 2
    new = load_weights(tmp_path / "out")
    for layer in cfg.moe_layers:
        r = f"layers.{layer}.ffn.router"
        for name in ("group_weight", "group_selection_bias"):  # the group router is untouched
            assert torch.equal(new[f"{r}.{name}"], state[f"{r}.{name}"])
        for name in ("weight", "selection_bias"):
            assert torch.equal(new[f"{r}.{name}"], state[f"{r}.{name}"][origin])
        w = f"layers.{layer}.ffn.experts.w_down"
        assert torch.equal(new[w], state[w][origin])
    x = torch.randn(64, 32)
    before, after = joint_probs(src, x), joint_probs(tmp_path / "out", x)
    for layer in cfg.moe_layers:
        (p, pg), (q, qg) = before[layer], after[layer]
        summed = torch.zeros_like(p).index_add_(1, torch.tensor(origin), q)
        torch.testing.assert_close(summed, p)  # each expert's probability, summed over copies
        torch.testing.assert_close(qg, pg)
        copies = [i for i, e in enumerate(origin) if origin.index(e) != i]
        for c in copies:  # an original and its copy share its probability equally
            torch.testing.assert_close(q[:, c], q[:, origin.index(origin[c])])
            torch.testing.assert_close(q[:, c] * 2, p[:, origin[c]])


def test_a_flat_plan_that_moves_an_expert_out_of_its_group_is_refused_before_writing(tmp_path):
    src = make(tmp_path)
    cfg, before = ModelDir(src).config(), digest(src)
    plan = split_plan(cfg.moe_layers, 8, {layer: [0, 4] for layer in cfg.moe_layers})
    with pytest.raises(ValueError, match=r"new expert 4 would sit in group 0 .* group\(s\) \[1\]"):
        write_edited(src, tmp_path / "out", plan)
    assert not (tmp_path / "out").exists() and digest(src) == before


def test_splits_and_adds_that_would_make_the_groups_unequal_are_refused(tmp_path):
    groups = expert_groups(ModelDir(make(tmp_path)).config().moe)
    with pytest.raises(ValueError, match=r"unequal numbers of copies \(group 0: 2, group 1: 0\)"):
        split_in_groups([0, 1], groups, {0: [0, 1], 1: [0, 1]})
    with pytest.raises(ValueError, match=r"experts \[9\] do not exist"):
        split_in_groups([0], groups, {0: [9, 1]})
    for n in (1, 3, 10):
        with pytest.raises(ValueError, match="add a multiple of 2 up to 8"):
            busiest_in_groups({0: torch.ones(8)}, n, groups)


def test_merges_stay_in_one_group_and_take_as_many_from_each(tmp_path):
    src = make(tmp_path)
    cfg, state = ModelDir(src).config(), load_weights(src)
    groups = expert_groups(cfg.moe)
    plan = merge_in_groups(cfg.moe_layers, groups, [[7, 6], [1, 0]])
    assert plan[0] == [Source((0, 1)), Source((2,)), Source((3,)), Source((4,)), Source((5,)),
                       Source((6, 7))]  # fmt: skip
    new = edit_state(state, cfg, plan)
    key = "layers.1.ffn.experts.w_up"
    torch.testing.assert_close(new[key][5], (state[key][6] + state[key][7]) / 2)
    assert torch.equal(new["layers.1.ffn.router.group_weight"],
                       state["layers.1.ffn.router.group_weight"])  # fmt: skip
    refusals = [
        ([[3, 4]], r"experts \[3, 4\] is invalid: they are in groups 0, 1"),
        ([[0, 1]], r"unequal numbers of experts .*\(group 0: 1, group 1: 0\)"),
        ([[0, 1, 2, 3], [4, 5, 6, 7]], "leaves each group 1 experts, fewer than the 2"),
        ([[0, 1], [1, 2]], r"experts \[1\] are named in two sets"),
        ([[3, 3]], "merging an expert with itself"),
        ([[3]], "two experts or more"),
    ]
    for sets, message in refusals:
        with pytest.raises(ValueError, match=message):
            merge_in_groups(cfg.moe_layers, groups, sets)


def test_pruning_ranks_the_experts_within_each_group(tmp_path):
    cfg = ModelDir(make(tmp_path)).config()
    groups = expert_groups(cfg.moe)
    scores = {layer: torch.tensor([5.0, 1, 4, 0, 9, 8, 7, 6]) for layer in cfg.moe_layers}
    plan = prune_in_groups(scores, 4, groups, top_k=2)
    assert [s.ids[0] for s in plan[0]] == [0, 2, 4, 5]  # the flat best four: 0, 4, 5, 6
    for keep, message in [
        (5, "keep a multiple of 2"),
        (2, "leaves each of the groups 0 .. 1 1, fewer than the 2 experts"),
        (1, "below top_k=2"),
        (8, "removes none"),
    ]:
        with pytest.raises(ValueError, match=message):
            prune_in_groups(scores, keep, groups, top_k=2)
    importance = ExpertImportance(16, {k: v.long() for k, v in scores.items()}, scores, 1.0)
    with pytest.raises(ValueError, match="prune a multiple of 2"):
        plan_edit(cfg, ExpertEdit("prune", count=3), importance, "reap")
    assert plan_edit(cfg, ExpertEdit("prune", count=4), importance, "reap") == plan


def test_a_lora_adapter_moves_with_its_experts_in_their_groups(tmp_path):
    cfg = ModelConfig.from_dict({**BASE, "moe": HIER})
    base = build_model(cfg, seed=2).eval()
    base_state = {k: v.clone() for k, v in base.state_dict().items()}
    lora = LoRAConfig(rank=2, targets=["*.ffn.experts.*", "*.ffn.router"], experts=[1, 4, 6])
    apply_lora(base, lora)
    with torch.no_grad():
        for k, t in adapter_state(base).items():
            if k.endswith(".B"):
                base.get_submodule(k.rsplit(".", 1)[0]).B.copy_(torch.randn(t.shape))
    save_adapter(base, lora, tmp_path / "tuned" / "adapter")
    merge_lora(base)
    ModelDir(tmp_path / "tuned").save_weights(
        {k: v for k, v in base.state_dict().items() if k in base_state}
    )
    ModelDir(tmp_path / "tuned").save_config(cfg)
    plan = split_in_groups(cfg.moe_layers, expert_groups(cfg.moe), {0: [1, 4], 1: [3, 6]})
    write_edited(tmp_path / "tuned", tmp_path / "edited", plan)
    # The edited base plus the edited adapter, merged, is the edited model.
    edited_base = build_model(ModelDir(tmp_path / "edited").config()).eval()
    edited_base.load_state_dict(edit_state(base_state, cfg, plan))
    load_adapter(edited_base, tmp_path / "edited" / "adapter")
    merge_lora(edited_base)
    theirs = edited_base.state_dict()
    for key, t in load_weights(tmp_path / "edited").items():
        torch.testing.assert_close(theirs[key], t, rtol=1e-5, atol=1e-6, msg=key)


def test_moekit_experts_edits_a_hierarchical_model_and_the_results_generate(
    tmp_path, tiny_model_dir, capsys
):
    src = make(tmp_path, tokenizer=tiny_model_dir)
    before = digest(src)
    common = ["--calibration-tokens", "512", "--quiet", "--json"]
    edits = {"add": (["--add", "2"], 10), "prune": (["--prune-to", "4"], 4),
             "merge": (["--merge", "0,1", "--merge", "6,7"], 6)}  # fmt: skip
    results = {}
    for name, (args, experts) in edits.items():
        out = tmp_path / name
        assert main(["experts", str(src), "--out", str(out), *args, *common]) == 0
        results[name] = json.loads(capsys.readouterr().out)
        assert results[name]["experts_after"] == experts, name
        cfg = ModelDir(out).config()
        assert cfg.moe.num_experts == experts and cfg.moe.router_groups == 2
        assert main(["generate", str(out), "The", "--max-new-tokens", "4"]) == 0
        capsys.readouterr()
    pruned = results["prune"]
    for layer, kept in pruned["kept"].items():  # the best two of each group, by REAP
        reap = torch.tensor(pruned["importance"]["reap"][layer])
        for g in (0, 1):
            best = reap[4 * g : 4 * g + 4].argsort(descending=True)[:2] + 4 * g
            assert sorted(kept[2 * g : 2 * g + 2]) == sorted(best.tolist())
    analysis = analyze(tmp_path / "merge", tmp_path / "an", max_tokens=256, seq_len=32,
                       shuffles=1, progress=False)  # fmt: skip
    for v in analysis.load.layers.values():  # 2 groups of 3 experts now
        per = v.tokens_per_expert
        assert v.groups.copies_per_group == [sum(per[:3]), sum(per[3:])] and len(per) == 6
    assert main(["doctor", str(tmp_path / "add"), "--json", "--tokens", "256"]) in (0, 1)
    report = json.loads(capsys.readouterr().out)
    assert "dead_groups" in {c["name"] for c in report["checks"]}
    with pytest.raises(UnsupportedError, match=r"moe\.router='hierarchical'"):  # no HF format
        export_hf(tmp_path / "add", tmp_path / "hf")
    # refused by name, nothing written
    code = main(["experts", str(src), "--out", str(tmp_path / "bad"), "--merge", "3,4", *common])
    assert code != 0 and "they are in groups 0, 1" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
    assert digest(src) == before


def test_a_flat_model_takes_several_merges_at_once():
    cfg = ModelConfig.from_dict({**BASE, "moe": dict(num_experts=6, top_k=2, expert_hidden=16)})
    groups = expert_groups(cfg.moe)
    assert (groups.count, groups.size) == (1, 6)
    plan = merge_in_groups(cfg.moe_layers, groups, [[4, 5], [0, 2]])
    assert plan[1] == [Source((0, 2)), Source((1,)), Source((3,)), Source((4, 5))]
    with pytest.raises(ValueError, match="fewer than top_k=2"):
        edited_config(cfg, merge_in_groups(cfg.moe_layers, groups, [[0, 1, 2, 3, 4, 5]]))


def test_bench_prune_refuses_counts_that_leave_the_groups_unequal(tmp_path):
    from moekit.bench.prune import bench_prune

    src = make(tmp_path)
    for keep, message in (((5,), "keep a multiple of 2"), ((6, 2), "leaves each of the groups")):
        with pytest.raises(ValueError, match=message):  # before any measuring
            bench_prune(src, tmp_path / "b", keep=keep, say=lambda _: None)
    assert not (tmp_path / "b").exists()
