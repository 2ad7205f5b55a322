"""The check on fine-tuned weights that never changed: LoRA adapters, ESFT and full
fine-tunes."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from moekit.model_dir import FinetuneSummary, ModelDir, load_model

from ._fixtures import FAST, checks_of, copy_model, edit_weights

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
    write_summary(model, method="lora", base="base")
    return model


def write_summary(model: Path, **fields) -> None:
    """A finetune.json as a fine-tuning run writes it (the counts are not what is checked)."""
    counts = dict(trainable_params=1, total_params=2, trainable_fraction=0.5, targets=[])
    ModelDir(model).write_finetune_summary(FinetuneSummary(**counts, **fields))


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
    experts = {str(k): v for k, v in esft_experts.items()} if esft_experts is not None else None
    write_summary(out, method=method, base=str(base), esft_experts=experts)
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
    write_summary(out, method="full", base="/nowhere/base")
    check = checks_of(out, **FAST)["adapters"]
    assert check.status == "ok" and check.data["applicable"] is False
    assert "/nowhere/base" in check.evidence
