"""`moekit doctor`: each silent failure, planted in a small model, is caught; healthy models
(random, trained here, and the trained demo model when present) pass clean."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from moekit.analysis.doctor import (
    Check,
    _check_dead_experts,
    _check_imbalance,
    _Sample,
    diagnose,
    worst_status,
)
from moekit.cli import main
from moekit.cli.doctor import exit_code
from moekit.config import ModelConfig
from moekit.model_dir import load_model, load_weights, save_model

from ._doctor_fixtures import (
    FAST,
    TINY_TRAIN,
    add_selection_bias,
    checks_of,
    copy_model,
    edit_moe_config,
    edit_weights,
    not_ok,
    write_checkpoint,
    write_metrics,
)

CHECK_NAMES = [
    "dead_experts",
    "load_imbalance",
    "router_collapse",
    "training_dead_experts",
    "selection_bias",
    "load_balancing",
    "adapters",
    "expert_copies",
    "router_precision",
]
DEMO = Path(__file__).resolve().parents[2] / "runs" / "demo"


@pytest.fixture
def model(tmp_path, tiny_model_dir) -> Path:
    """A fresh copy of the random-init debug model (2 MoE layers, 8 experts, top-2)."""
    return copy_model(tiny_model_dir, tmp_path / "model")


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, _private_cache) -> Path:
    """A tiny MoE trained for 24 steps with aux-loss-free balancing (sigmoid scores, a
    selection bias updated every step) and an aux loss; checkpoints every 8 steps."""
    from moekit.training.config import resolve_run_config
    from moekit.training.trainer import train

    cfg = resolve_run_config(
        preset="debug",
        overrides=[*TINY_TRAIN, "train.max_steps=24", "train.save_every=8",
                   "model.moe.score_func=sigmoid", "model.moe.bias_update_rate=0.001"],
    )  # fmt: skip
    out = tmp_path_factory.mktemp("trained") / "run"
    train(cfg, out, verbose=False, report=False)
    return out


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


@pytest.mark.skipif(not (DEMO / "model.safetensors").is_file(), reason="runs/demo not trained")
def test_the_demo_model_passes_clean():
    checks = checks_of(DEMO)
    assert not_ok(checks) == {}
    assert checks["training_dead_experts"].data["run_dir"] == str(DEMO)


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
    sample = _Sample(tokens=4096, copies={0: [1000] * 7 + [30]}, entropy={0: 1.9},
                     logits_dtypes={"float32"}, top_k=2)  # fmt: skip
    check = _check_dead_experts(sample, dead_share=0.1)
    assert check.status == "warning"
    assert check.data["layers"]["0"]["nearly_dead"] == [7]
    assert "expert 7 got 3% of an even share" in check.evidence
    assert _check_dead_experts(sample, dead_share=0.02).status == "ok"


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
    sample = _Sample(tokens=1000, copies={0: [625, 125, 125, 125]}, entropy={0: 1.0},
                     logits_dtypes={"float32"}, top_k=1)  # fmt: skip
    assert _check_imbalance(sample, cfg, 2.0, 3.0).status == "warning"  # 2.5x
    assert _check_imbalance(sample, cfg, 2.0, 2.4).status == "problem"
    assert _check_imbalance(sample, cfg, 2.6, 3.0).status == "ok"


# ---- 3. router collapse --------------------------------------------------------------------------


def test_a_saturated_router_is_a_collapse(model):
    # Router weights of enormous norm: each token's softmax is one-hot.
    edit_weights(model, lambda s: s["layers.0.ffn.router.weight"].mul_(1e4))
    check = checks_of(model, sample_tokens=1024)["router_collapse"]
    assert check.status == "problem", check.evidence
    assert check.data["layers"]["0"]["normalised_entropy"] < 0.01
    assert check.data["layers"]["1"]["normalised_entropy"] > 0.9
    assert "layer 0" in check.evidence and "layer 1" not in check.evidence


# ---- 4. dead experts in the run's metrics --------------------------------------------------------


@pytest.mark.parametrize(
    ("dead", "status"),
    [
        ([{"0": 0, "1": 0}, {"0": 0, "1": 2}, {"0": 0, "1": 2}, {"0": 0, "1": 1}], "problem"),
        ([{"0": 0, "1": 0}, {"0": 0, "1": 0}, {"0": 1, "1": 0}, {"0": 0, "1": 0}], "ok"),
        ([{"0": 0, "1": 2}, {"0": 0, "1": 0}, {"0": 0, "1": 0}, {"0": 0, "1": 1}], "warning"),
    ],
)
def test_dead_experts_in_the_training_metrics(model, dead, status):
    write_metrics(model, dead)
    check = checks_of(model, **FAST)["training_dead_experts"]
    assert check.status == status, check.evidence
    assert check.data["step"] == 40
    if status == "problem":
        assert check.data["persistent_layers"] == ["1"]
        assert "last 3 training records" in check.evidence and "layer 1: 1" in check.evidence


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


# ---- 7. fine-tuned weights that never changed ----------------------------------------------------


def _lora_dir(model: Path, targets: list[str], *, zero: tuple[str, ...] = (),
              zero_expert: tuple[str, int] | None = None) -> Path:  # fmt: skip
    """`model` with a saved LoRA adapter (rank 2, experts 0-2 adapted) whose B tensors are
    trained (random) except the targets in `zero` and the (target, expert) `zero_expert`."""
    from moekit.finetune.lora import LoRAConfig, adapter_modules, apply_lora, save_adapter

    net = load_model(model)
    cfg = LoRAConfig(rank=2, targets=targets, experts=[0, 1, 2])
    apply_lora(net, cfg)
    with torch.no_grad():
        for name, adapter in adapter_modules(net):
            if name in zero:
                continue
            adapter.B.normal_()
            if zero_expert is not None and name == zero_expert[0]:
                adapter.B[zero_expert[1]] = 0.0
    save_adapter(net, cfg, model / "adapter", base="base")
    (model / "finetune.json").write_text(json.dumps({"method": "lora", "base": "base"}))
    return model


LORA_TARGETS = ["*.attn.wq", "*.ffn.experts.w_up", "*.ffn.router"]


def test_trained_lora_adapters_pass(model):
    check = checks_of(_lora_dir(model, LORA_TARGETS), **FAST)["adapters"]
    assert check.status == "ok", check.evidence
    # 2 layers x (wq, router, stacked w_up); masked experts 3-7 have zero B and are fine.
    assert check.data["adapted_weights"] == 6 and check.data["expert_adapters"] == 2


def test_a_lora_target_never_updated_is_a_problem(model):
    _lora_dir(
        model, LORA_TARGETS, zero=("layers.1.attn.wq.lora", "layers.0.ffn.experts.adapters.w_up")
    )
    check = checks_of(model, **FAST)["adapters"]
    assert check.status == "problem", check.evidence
    assert check.data["untrained_targets"] == [
        "layers.0.ffn.experts.adapters.w_up",
        "layers.1.attn.wq.lora",
    ]
    assert "2 of 6 adapted weights were never updated" in check.evidence


def test_an_adapted_expert_never_updated_is_a_warning(model):
    _lora_dir(model, LORA_TARGETS, zero_expert=("layers.1.ffn.experts.adapters.w_up", 2))
    check = checks_of(model, **FAST)["adapters"]
    assert check.status == "warning", check.evidence
    assert check.data["untrained_experts"] == {"layers.1.ffn.experts.adapters.w_up": [2]}


def test_lora_that_leaves_the_experts_frozen_is_a_warning(model):
    check = checks_of(_lora_dir(model, ["*.attn.w*"]), **FAST)["adapters"]
    assert check.status == "warning", check.evidence
    assert "left the expert weights frozen" in check.evidence


def test_a_real_lora_finetune_passes(tmp_path, tiny_model_dir):
    from moekit.training.config import finetune_run_config
    from moekit.training.trainer import train

    rows = [
        {"prompt": f"{a} + {b} = ", "completion": str(a + b)} for a in range(8) for b in range(4)
    ]
    data = tmp_path / "sft.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    cfg = finetune_run_config(
        tiny_model_dir, data,
        overrides=["train.max_steps=3", "train.batch_size=4", "train.seq_len=32",
                   "train.warmup_steps=1", "train.eval_every=100", "train.log_every=1",
                   "train.save_every=100", "train.sample_tokens=2", "train.lr=1e-2"],
    )  # fmt: skip
    out = tmp_path / "ft"
    train(cfg, out, verbose=False, report=False)
    checks = checks_of(out, **FAST)
    # The adapters moekit writes are read right: every target moved. (Three steps on narrow
    # data may leave an expert without a token, hence an expert-level warning at most.)
    check = checks["adapters"]
    assert check.status in ("ok", "warning"), check.evidence
    assert check.data["untrained_targets"] == []
    assert check.data["adapted_weights"] == 14  # wq/wk/wv/wo and 3 expert stacks, x 2 layers
    assert checks["training_dead_experts"].data["step"] == 3
    assert checks["adapters"].data["expert_adapters"] == 6


def _tuned(tmp_path: Path, base: Path, method: str, changed: dict[int, list[int]],
           esft_experts: dict[int, list[int]] | None = None) -> Path:  # fmt: skip
    """A copy of `base` whose experts in `changed` (layer -> experts) differ from it, with the
    finetune.json of an ESFT or full fine-tune of `base`."""
    out = copy_model(base, tmp_path / method)

    def edit(state: dict[str, torch.Tensor]) -> None:
        for layer, experts in changed.items():
            for e in experts:
                state[f"layers.{layer}.ffn.experts.w_up"][e] += 1e-3

    edit_weights(out, edit)
    info: dict = {"method": method, "base": str(base)}
    if esft_experts is not None:
        info["esft_experts"] = {str(k): v for k, v in esft_experts.items()}
    (out / "finetune.json").write_text(json.dumps(info))
    return out


def test_esft_experts_identical_to_the_base_are_a_problem(tmp_path, tiny_model_dir):
    chosen = {0: [1, 2], 1: [5]}
    healthy = _tuned(tmp_path / "a", tiny_model_dir, "esft", chosen, chosen)
    assert checks_of(healthy, **FAST)["adapters"].status == "ok"
    stuck = _tuned(tmp_path / "b", tiny_model_dir, "esft", {0: [1], 1: [5]}, chosen)
    check = checks_of(stuck, **FAST)["adapters"]
    assert check.status == "problem", check.evidence
    assert check.data["unchanged"] == {"0": [2]}
    assert "layer 0: expert(s) 2" in check.evidence
    # A frozen expert that moved is a leak in the freezing.
    leaky = _tuned(tmp_path / "c", tiny_model_dir, "esft", {0: [1, 2, 7], 1: [5]}, chosen)
    check = checks_of(leaky, **FAST)["adapters"]
    assert check.status == "warning" and check.data["frozen_but_changed"] == {"0": [7]}


def test_a_full_finetune_with_untouched_experts_is_a_problem(tmp_path, tiny_model_dir):
    every = list(range(8))
    healthy = _tuned(tmp_path / "a", tiny_model_dir, "full", {0: every, 1: every})
    assert checks_of(healthy, **FAST)["adapters"].status == "ok"
    stuck = _tuned(tmp_path / "b", tiny_model_dir, "full", {0: every, 1: every[:6]})
    check = checks_of(stuck, **FAST)["adapters"]
    assert check.status == "problem" and check.data["unchanged"] == {"1": [6, 7]}


def test_a_finetune_whose_base_is_gone_is_not_compared(tmp_path, tiny_model_dir):
    out = _tuned(tmp_path, tiny_model_dir, "full", {})
    (out / "finetune.json").write_text(json.dumps({"method": "full", "base": "/nowhere/base"}))
    check = checks_of(out, **FAST)["adapters"]
    assert check.status == "ok" and check.data["applicable"] is False
    assert "/nowhere/base" in check.evidence


# ---- 8. experts that are copies, or zeros --------------------------------------------------------


def copy_expert(state: dict[str, torch.Tensor], *, layer: int, src: int, dst: int) -> None:
    for proj in ("w_gate", "w_up", "w_down"):
        w = state[f"layers.{layer}.ffn.experts.{proj}"]
        w[dst] = w[src]


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
    assert report["counts"] == {"ok": 9, "warning": 0, "problem": 0}
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
    assert "9 checks: 8 ok, 0 warning(s), 1 problem(s); exit code 1" in out


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
