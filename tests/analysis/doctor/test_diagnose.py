"""`moekit doctor` as a whole: healthy models (random, trained here, and the trained demo
model when present) pass clean, what cannot be measured or does not apply is said so, bad
input is an error that names it, and the command line prints, exits and writes JSON."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from moekit.analysis.doctor import Check, Diagnosis, diagnose, exit_code, worst_status
from moekit.cli import main
from moekit.config import ModelConfig
from moekit.model_dir import save_model

from ._fixtures import (
    CHECK_NAMES,
    FAST,
    checks_of,
    copy_expert,
    copy_model,
    edit_moe_config,
    edit_weights,
    not_ok,
    write_metrics,
)

DEMO = Path(__file__).resolve().parents[3] / "runs" / "demo"


# ---- healthy models pass clean ------------------------------------------------------------------


def test_a_random_init_model_passes_clean(model):
    checks = diagnose(model)
    assert [c.name for c in checks] == CHECK_NAMES
    assert not_ok({c.name: c for c in checks}) == {}
    by_name = {c.name: c for c in checks}
    # The routing checks measured something, and say on how much text.
    assert by_name["dead_experts"].data["tokens"] == 4096
    assert "4,096 tokens" in by_name["load_imbalance"].evidence
    assert by_name["training_dead_experts"].data["applicable"] is False  # no run directory


def test_a_trained_model_with_bias_balancing_passes_clean(trained_run):
    checks = checks_of(trained_run)
    assert not_ok(checks) == {}
    # The run's own checks applied: metrics were read, the two newest checkpoints compared.
    assert checks["training_dead_experts"].data["step"] == 24
    bias = checks["selection_bias"].data
    assert bias["checkpoints"] == ["step-00000016", "step-00000024"]
    assert min(bias["max_change"].values()) > 0


def _demo_finished() -> bool:
    """runs/demo holds a model trained to its last step (`make demo` ran to the end; a run
    stopped early also saves its model, and a half-trained model is not the demo's)."""
    from moekit.training.checkpoint import newest_checkpoint
    from moekit.training.config import RunConfig

    if not (DEMO / "model.safetensors").is_file() or not (DEMO / "run.json").is_file():
        return False
    saved = newest_checkpoint(DEMO)
    steps = RunConfig.from_dict(json.loads((DEMO / "run.json").read_text())).train.max_steps
    return saved is not None and saved.step >= steps


@pytest.mark.skipif(not _demo_finished(), reason="runs/demo not trained to its end")
def test_the_demo_model_passes_clean():
    checks = checks_of(DEMO)
    assert not_ok(checks) == {}
    assert checks["training_dead_experts"].data["run_dir"] == str(DEMO)


# ---- what cannot be measured, and what does not apply --------------------------------------------


def test_without_a_tokenizer_routing_is_reported_unmeasured(model):
    (model / "tokenizer.json").unlink()
    checks = checks_of(model, **FAST)
    for name in ("dead_experts", "load_imbalance", "router_collapse"):
        assert checks[name].status == "warning"
        assert "no tokenizer.json" in checks[name].evidence
    assert checks["expert_copies"].status == "ok"  # the weight checks still ran


def test_weights_that_do_not_load_are_reported_not_raised(model):
    edit_weights(model, lambda s: s.pop("layers.0.attn.wq.weight"))
    checks = checks_of(model, **FAST)
    assert checks["dead_experts"].status == "warning"
    assert "could not be run" in checks["dead_experts"].evidence
    assert "layers.0.attn.wq.weight" in checks["dead_experts"].evidence


def test_a_dense_model_has_nothing_to_check(tmp_path, tiny_model_dir):
    from moekit import build_model

    data = ModelConfig.load(tiny_model_dir).to_dict()
    data["moe"] = None
    cfg = ModelConfig.from_dict(data)
    out = copy_model(tiny_model_dir, tmp_path / "dense")
    save_model(build_model(cfg, seed=0), cfg, out)
    checks = diagnose(out)
    assert all(c.status == "ok" and c.data["applicable"] is False for c in checks)


def test_bad_input_is_an_error_that_names_it(tmp_path, model):
    with pytest.raises(FileNotFoundError, match=r"no config\.json"):
        diagnose(tmp_path)
    with pytest.raises(FileNotFoundError, match="not a training run directory"):
        diagnose(model, run_dir=tmp_path)
    with pytest.raises(ValueError, match="dead_share=2"):
        diagnose(model, dead_share=2)
    with pytest.raises(ValueError, match="imbalance_warning=3"):
        diagnose(model, imbalance_warning=3, imbalance_problem=2)
    with pytest.raises(ValueError, match=r"Check\.status='bad'"):
        Check("x", "bad", "")  # type: ignore[arg-type]


# ---- the command line ------------------------------------------------------------------------------


def doctor(capsys, *argv: object) -> tuple[int, str]:
    code = main(["doctor", *(str(a) for a in argv)])
    return code, capsys.readouterr().out


def test_cli_json_and_exit_codes(capsys, model):
    code, out = doctor(capsys, model, "--json", "--tokens", 512)
    report = json.loads(out)
    assert code == 0 and report["status"] == "ok" and report["exit_code"] == 0
    assert [c["name"] for c in report["checks"]] == CHECK_NAMES
    assert report["counts"] == {"ok": 10, "warning": 0, "problem": 0}
    assert report["checks"][0]["data"]["tokens"] == 512

    edit_weights(model, lambda s: copy_expert(s, layer=1, src=0, dst=1))
    code, out = doctor(capsys, model, "--json", "--tokens", 512)
    assert code == 0 and json.loads(out)["status"] == "warning"  # warnings pass ...
    code, out = doctor(capsys, model, "--json", "--tokens", 512, "--strict")
    assert code == 1  # ... unless --strict

    edit_moe_config(model, aux_loss_weight=0.0)
    code, out = doctor(capsys, model, "--json", "--tokens", 512)
    report = json.loads(out)
    assert code == 1 and report["status"] == "problem" and report["counts"]["problem"] == 1


def test_cli_prints_each_check_with_evidence_and_advice(capsys, model):
    edit_moe_config(model, aux_loss_weight=0.0)
    code, out = doctor(capsys, model, "--tokens", 512)
    assert code == 1
    for name in CHECK_NAMES:
        assert name.replace("_", " ") in out
    assert "problem" in out and "what to do:" in out
    assert "10 checks: 9 ok, 0 warning(s), 1 problem(s); exit code 1" in out


def test_cli_run_option_reads_another_directory(capsys, tmp_path, model):
    run = tmp_path / "run"
    run.mkdir()
    write_metrics(run, [{"0": 1, "1": 0}] * 3)
    code, out = doctor(capsys, model, "--run", run, "--json", "--tokens", 512)
    report = json.loads(out)
    assert code == 1 and report["run_dir"] == str(run)
    dead = next(c for c in report["checks"] if c["name"] == "training_dead_experts")
    assert dead["status"] == "problem"


def test_statuses_order_and_exit_code():
    checks = [Check("a", "ok", ""), Check("b", "warning", "")]
    assert worst_status(checks) == "warning" and worst_status([]) == "ok"
    assert exit_code(checks) == 0 and exit_code(checks, strict=True) == 1
    assert exit_code([*checks, Check("c", "problem", "")]) == 1


def test_the_diagnosis_is_a_typed_sequence_of_checks(model):
    diagnosis = diagnose(model, **FAST)
    assert isinstance(diagnosis, Diagnosis) and len(diagnosis) == len(CHECK_NAMES)
    assert diagnosis[0].name == "dead_experts" and diagnosis[-1].name == "dead_groups"
    assert diagnosis.model_dir == str(model) and diagnosis.run_dir is None
    assert diagnosis.status == "ok" and diagnosis.counts() == {"ok": 10, "warning": 0,
                                                               "problem": 0}  # fmt: skip
    report = diagnosis.to_dict()
    assert list(report) == ["model_dir", "run_dir", "status", "counts", "exit_code", "checks"]
    assert report["checks"] == [c.to_dict() for c in diagnosis]
