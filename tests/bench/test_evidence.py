"""`moekit evidence`: the variants hold what their claims hold equal, verdicts read the seed
spread, and a tiny suite runs end to end into its report."""

import json

import pytest

from moekit.bench.evidence import (
    COMPARISONS,
    VARIANTS,
    Budget,
    Comparison,
    RunFigures,
    budget,
    run_config,
    run_evidence,
    verdict,
)
from moekit.bench.evidence_report import write_report
from moekit.cli.commands import main
from moekit.config import ModelConfig
from moekit.params import count_params
from moekit.training.config import resolve_run_config

TINY = Budget(
    "tiny",
    dict(vocab_size=512, dim=32, num_layers=2, num_heads=2, num_kv_heads=2, ffn_hidden=64,
         max_seq_len=64, moe=dict(num_experts=4, top_k=2, expert_hidden=32)),
    {"max_chars_per_domain": 40_000},
    dict(max_steps=4, batch_size=4, seq_len=32, lr=3e-3, warmup_steps=1, eval_every=2,
         eval_batches=2, log_every=1),
    seeds=(0, 1),
)  # fmt: skip


@pytest.mark.parametrize("name", ["small", "full"])
def test_variants_hold_active_parameters_equal_where_the_claim_says(name):
    base = budget(name).model

    def active(model):  # without the router, whose size follows the expert count
        pc = count_params(ModelConfig.from_dict(model))
        return pc.active - pc.active_by["router"]

    moe = active(base)
    variants = ("dense_active", "fine_shared", "aux_free", "capacity_1.0", "expert_choice",
                "hierarchical")  # fmt: skip
    for variant in variants:
        assert abs(active(VARIANTS[variant](base)) - moe) / moe < 0.01, variant
    fine = ModelConfig.from_dict(VARIANTS["fine_shared"](base)).moe
    assert fine.num_experts == 32 and fine.num_shared_experts == 1 and fine.top_k == 7


def test_the_full_budget_is_the_demo_recipe_for_half_its_steps():
    demo = resolve_run_config(config_file="demo")
    full = budget("full")
    assert ModelConfig.from_dict(full.model) == demo.model
    cfg = run_config(full, full.model, seed=0)
    for name in ("batch_size", "seq_len", "lr", "warmup_steps", "min_lr_ratio", "eval_every",
                 "eval_batches"):  # fmt: skip
        assert getattr(cfg.train, name) == getattr(demo.train, name), name
    assert cfg.data == demo.data
    assert cfg.train.max_steps * 2 == demo.train.max_steps


def run(variant, seed, loss):
    return RunFigures(variant, seed, loss, [], [], 0.0, 1.0, 1, 1)


def test_a_difference_counts_only_beyond_the_seed_spread():
    c = Comparison("x", "X", "a", "b")
    # seed 1 is worse for both sides: paired by seed, the difference is clear
    clear = verdict(c, [run("a", 0, 2.0), run("a", 1, 2.6)], [run("b", 0, 2.2), run("b", 1, 2.7)])
    assert clear.difference == pytest.approx(-0.15) and clear.spread == pytest.approx(0.1)
    assert clear.reading.startswith("a is better by 0.1500 with every seed")
    mixed = verdict(c, [run("a", 0, 2.0), run("a", 1, 2.4)], [run("b", 0, 2.1), run("b", 1, 2.3)])
    assert "within the seed-to-seed spread (0.2000)" in mixed.reading  # the signs differ
    small = verdict(c, [run("a", 0, 2.0), run("a", 1, 2.5)], [run("b", 0, 2.02), run("b", 1, 2.7)])
    assert "within" in small.reading  # same sign, mean 0.11 below the spread 0.18
    worse = verdict(c, [run("a", 0, 3.0), run("a", 1, 3.05)], [run("b", 0, 2.0), run("b", 1, 2.1)])
    assert worse.reading.startswith("b is better")
    one = verdict(c, [run("a", 0, 2.0)], [run("b", 0, 2.5)])
    assert one.spread is None and "one seed" in one.reading


def test_a_tiny_suite_runs_into_its_report(tmp_path):
    only = ("moe_vs_dense", "aux_free", "capacity", "upcycling", "topk_inference")
    evidence = run_evidence(TINY, tmp_path, only=only, say=lambda _: None)
    assert [v.key for v in evidence.verdicts] == [
        "moe_vs_dense",
        "aux_free",
        "upcycling",
        "capacity",
    ]
    for v in evidence.verdicts:
        assert len(v.runs) == 4 and v.spread is not None
        assert v.difference == pytest.approx(v.variant_loss - v.baseline_loss)
        for r in v.runs:
            assert r.val_loss > 0 and [p["step"] for p in r.curve] == [2, 4]
    cap = next(v for v in evidence.verdicts if v.key == "capacity")
    assert all(r.drop_rate > 0 for r in cap.runs if r.variant == "capacity_1.0")
    assert all(r.drop_rate == 0 for r in cap.runs if r.variant == "moe")  # dropless
    # the base MoE trained once per seed, shared by the comparisons
    assert sorted(p.name for p in (tmp_path / "runs").iterdir() if p.name.startswith("moe-")) == [
        "moe-s0",
        "moe-s1",
    ]
    assert [r["k"] for r in evidence.topk] == [1, 2, 3, 4]
    paths = write_report(evidence, tmp_path)
    data = json.loads(paths[0].read_text())
    assert data["verdicts"][0]["variant_loss"] == evidence.verdicts[0].variant_loss
    summary = paths[1].read_text()
    assert "| MoE vs dense at equal active parameters |" in summary and "Balance" in summary
    html = paths[2].read_text()
    assert html.count("<img") == 5 and "Experts per token at inference" in html


def test_the_command_refuses_unknown_comparisons(tmp_path, capsys):
    assert main(["evidence", "--out", str(tmp_path), "--only", "nonsense", "--steps", "2"]) != 0
    assert "comparison 'nonsense' is unknown" in capsys.readouterr().err
    assert {c.key for c in COMPARISONS} >= {"moe_vs_dense", "fine_grained", "aux_free"}


def test_an_interrupted_run_continues_and_a_finished_one_is_read(tmp_path):
    from dataclasses import replace

    from moekit.bench.evidence import train_variant
    from moekit.model_dir import ModelDir

    whole = train_variant(TINY, "moe", 0, tmp_path / "whole")
    # a suite stopped after the first checkpoint (step 2 of 4; with one warm-up step the
    # learning rate up to there does not depend on max_steps): the run continues from it
    short = replace(TINY, train={**TINY.train, "max_steps": 2})
    stopped = train_variant(short, "moe", 0, tmp_path / "moe-s0")
    assert [p["step"] for p in stopped.curve] == [2]
    resumed = train_variant(TINY, "moe", 0, tmp_path / "moe-s0")
    assert [p["step"] for p in resumed.curve] == [2, 4]
    assert resumed.val_loss == pytest.approx(whole.val_loss, abs=1e-6)
    # a finished run is read again, not trained again
    weights = ModelDir(tmp_path / "moe-s0").path / "model.safetensors"
    before = weights.stat().st_mtime_ns
    assert train_variant(TINY, "moe", 0, tmp_path / "moe-s0").val_loss == resumed.val_loss
    assert weights.stat().st_mtime_ns == before


def test_runs_train_in_parallel_processes_as_they_do_one_after_the_other(tmp_path):
    from moekit.bench.evidence import train_all

    tasks = [("moe", 0), ("dense_active", 0), ("upcycled", 0)]
    one = train_all(TINY, tasks, tmp_path / "one", say=lambda _: None)
    heard: list[str] = []
    two = train_all(TINY, tasks, tmp_path / "two", jobs=2, say=heard.append)
    assert set(two) == set(tasks)
    for key in tasks:
        assert two[key].val_loss == pytest.approx(one[key].val_loss, abs=1e-4)
        assert [p["step"] for p in two[key].curve] == [p["step"] for p in one[key].curve]
    assert heard[0].startswith("training 3 runs, 2 at a time")
    assert sum(line.startswith("finished ") for line in heard) == 3
    with pytest.raises(ValueError, match="jobs=0 is invalid"):
        train_all(TINY, tasks, tmp_path / "three", jobs=0)
