"""The check on fine-tuned weights that never changed: LoRA adapters whose B is still zero,
and ESFT or full fine-tunes whose trained experts equal the base model's."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from moekit.analysis.doctor.check import Check, ids, moe_layers, not_applicable
from moekit.analysis.doctor.weight_files import WeightFiles
from moekit.model_dir import FinetuneSummary, ModelDir

if TYPE_CHECKING:
    import torch

    from moekit.config import ModelConfig

NAME = "adapters"
PROJECTIONS = ("w_gate", "w_up", "w_down")


def check_adapters(cfg: ModelConfig, model_dir: Path, weights: WeightFiles) -> Check:
    """adapters: a LoRA adapter (adapter/) or an ESFT/full fine-tune (finetune.json) whose
    trained weights never moved is a problem; a partly untrained one a warning."""
    adapter_dir = ModelDir(model_dir).adapter_dir
    summary = ModelDir(model_dir).finetune_summary()
    if (adapter_dir / ModelDir.ADAPTER_WEIGHTS).is_file():
        return check_lora(
            cfg, adapter_dir / ModelDir.ADAPTER_WEIGHTS, adapter_dir / ModelDir.ADAPTER_CONFIG
        )
    method = summary.method if summary is not None else None
    if summary is not None and method in ("esft", "full"):
        return check_tuned_experts(cfg, model_dir, weights, summary)
    if method == "lora":
        return Check(
            NAME,
            "problem",
            f"finetune.json says method 'lora' but {adapter_dir} holds no "
            f"{ModelDir.ADAPTER_WEIGHTS}.",
            "Copy the adapter/ folder of the fine-tuning run into this directory, or fine-tune "
            "again: without it the adapters cannot be checked, exported or unmerged.",
            {"method": "lora"},
        )
    return not_applicable(NAME, "not a fine-tuned model directory (no adapter/, no finetune.json)")


# ---- LoRA --------------------------------------------------------------------------------------


@dataclass
class _LoraScan:
    """Which adapted weights of an adapter file never received an update."""

    targets: int = 0
    expert_targets: int = 0
    untrained_targets: list[str] = field(default_factory=list)
    untrained_experts: dict[str, list[int]] = field(default_factory=dict)


def _scan_lora(state: dict[str, torch.Tensor]) -> _LoraScan:
    scan = _LoraScan()
    for key in sorted(state):
        if not key.endswith(".B"):
            continue
        prefix = key.removesuffix(".B")
        b = state[key]
        scan.targets += 1
        if b.dim() == 3:  # stacked experts: (E, out, rank), with a mask of adapted experts
            scan.expert_targets += 1
            mask = state.get(f"{prefix}.mask")
            adapted = [e for e in range(b.shape[0]) if mask is None or float(mask[e]) > 0]
            zero = [e for e in adapted if not bool(b[e].any())]
            if not adapted or len(zero) == len(adapted):  # no expert adapted, or none trained
                scan.untrained_targets.append(prefix)
            elif zero:
                scan.untrained_experts[prefix] = zero
        elif not bool(b.any()):
            scan.untrained_targets.append(prefix)
    return scan


def check_lora(cfg: ModelConfig, weights_file: Path, config_file: Path) -> Check:
    """Every adapter's B starts at exactly zero: a B still zero never received an update."""
    from safetensors.torch import load_file

    try:
        state = load_file(str(weights_file))
    except Exception as e:  # safetensors raises its own error types
        raise ValueError(f"{weights_file} is not a readable safetensors file ({e})") from e
    scan = _scan_lora(state)
    data: dict[str, Any] = {
        "method": "lora",
        "adapted_weights": scan.targets,
        "expert_adapters": scan.expert_targets,
        "untrained_targets": scan.untrained_targets,
        "untrained_experts": scan.untrained_experts,
    }
    if scan.targets == 0:
        return Check(
            NAME,
            "problem",
            f"{weights_file} holds no adapter (no '.B' tensor).",
            "Save the adapter again with moekit.finetune.lora.save_adapter.",
            data,
        )
    advice = (
        "LoRA's B starts at exactly zero, so a B that is still zero never received a gradient: "
        "the adapter did nothing. Check that the targeted weights are on the loss path, that "
        "their parameters are in the optimizer, and that the learning rate is not 0; an "
        "expert's B stays zero when no fine-tuning token was routed to it (more or more varied "
        "data, or adapt fewer experts with lora experts=[...])."
    )
    if untrained := scan.untrained_targets:
        evidence = (
            f"{len(untrained)} of {scan.targets} adapted weights were never updated (B is "
            f"exactly zero): {', '.join(untrained[:6])}" + (" ..." if len(untrained) > 6 else "")
            + "."
        )  # fmt: skip
        return Check(NAME, "problem", evidence, advice, data)
    if scan.untrained_experts:
        evidence = (
            "some adapted experts were never updated (their B is exactly zero): "
            + "; ".join(
                f"{k}: expert(s) {ids(v)}" for k, v in list(scan.untrained_experts.items())[:6]
            )
            + "."
        )
        return Check(NAME, "warning", evidence, advice, data)
    if cfg.moe is not None and scan.expert_targets == 0:
        return _experts_left_frozen(scan, config_file, data)
    evidence = (
        f"all {scan.targets} adapted weights ({scan.expert_targets} of them over stacked "
        "experts) were updated: no adapter's B is still zero (masked experts excepted)."
    )
    return Check(NAME, "ok", evidence, "", data)


def _experts_left_frozen(scan: _LoraScan, config_file: Path, data: dict[str, Any]) -> Check:
    lora_targets: Any = None
    if config_file.is_file():
        lora_targets = json.loads(config_file.read_text()).get("lora", {}).get("targets")
    data["lora_targets"] = lora_targets
    evidence = (
        f"all {scan.targets} adapted weights were updated, but no adapter touches the routed "
        f"experts (targets {lora_targets}): LoRA left the expert weights frozen."
    )
    advice = (
        "If you meant to adapt the experts, include '*.ffn.experts.*' in the LoRA targets "
        "(the default does); adapters that only wrap nn.Linear layers miss stacked experts."
    )
    return Check(NAME, "warning", evidence, advice, data)


# ---- ESFT and full fine-tunes -------------------------------------------------------------------


def _find_base(model_dir: Path, base: str) -> Path | None:
    for candidate in (Path(base), model_dir / base, model_dir.parent / base):
        if ModelDir(candidate).is_model():
            return candidate
    return None


def check_tuned_experts(
    cfg: ModelConfig, model_dir: Path, weights: WeightFiles, summary: FinetuneSummary
) -> Check:
    """ESFT and full fine-tuning: each expert that was to train must differ from the base."""
    method = summary.method
    base_name = summary.base
    if cfg.moe is None:
        return not_applicable(NAME, f"a {method} fine-tune of a dense model has no experts")
    base_dir = _find_base(model_dir, base_name) if base_name else None
    if base_dir is None:
        return not_applicable(
            NAME, f"{method} fine-tune whose base model directory {base_name!r} is not here"
        )
    if method == "esft":
        chosen = {int(k): list(v) for k, v in (summary.esft_experts or {}).items()}
    else:
        chosen = {i: list(range(cfg.moe.num_experts)) for i in moe_layers(cfg)}
    compared = _compare_with_base(cfg, weights, base_dir, chosen, method)
    if isinstance(compared, Check):
        return compared
    unchanged, leaked = compared
    data = {
        "method": method,
        "base": str(base_dir),
        "trained_experts": {str(k): v for k, v in chosen.items()},
        "unchanged": unchanged,
        "frozen_but_changed": leaked,
    }
    return _tuned_verdict(method, base_dir, chosen, unchanged, leaked, data)


def _compare_with_base(
    cfg: ModelConfig,
    weights: WeightFiles,
    base_dir: Path,
    chosen: dict[int, list[int]],
    method: str,
) -> tuple[dict[str, list[int]], dict[str, list[int]]] | Check:
    """(trained experts equal to the base, frozen experts that differ from it) by layer; or,
    when a tensor's shape differs from the base's, the warning that says so."""
    import torch

    assert cfg.moe is not None
    base = WeightFiles(base_dir)
    unchanged: dict[str, list[int]] = {}
    leaked: dict[str, list[int]] = {}
    for i in moe_layers(cfg):
        names = [f"layers.{i}.ffn.experts.{p}" for p in PROJECTIONS]
        names = [n for n in names if n in weights and n in base]
        if not names:
            continue
        same = [True] * cfg.moe.num_experts
        for n in names:
            ours, theirs = weights.get(n), base.get(n)
            if ours.shape != theirs.shape:
                return Check(
                    NAME,
                    "warning",
                    f"{n} has shape {tuple(ours.shape)} here but {tuple(theirs.shape)} in the "
                    f"base {base_dir}: finetune.json names another model as base.",
                    "Point finetune.json's base at the model this one was tuned from.",
                    {"method": method, "base": str(base_dir)},
                )
            for e in range(ours.shape[0]):
                same[e] = same[e] and torch.equal(ours[e], theirs[e])
        picked = set(chosen.get(i, []))
        if untouched := [e for e in sorted(picked) if e < len(same) and same[e]]:
            unchanged[str(i)] = untouched
        if method == "esft" and (
            moved := [e for e in range(len(same)) if e not in picked and not same[e]]
        ):
            leaked[str(i)] = moved
    return unchanged, leaked


def _tuned_verdict(
    method: str,
    base_dir: Path,
    chosen: dict[int, list[int]],
    unchanged: dict[str, list[int]],
    leaked: dict[str, list[int]],
    data: dict[str, Any],
) -> Check:
    what = "chosen (ESFT)" if method == "esft" else "trained"
    if unchanged:
        evidence = (
            f"{what} experts are bitwise identical to the base {base_dir}: "
            + "; ".join(f"layer {k}: expert(s) {ids(v)}" for k, v in unchanged.items())
            + "."
        )
        advice = (
            "These experts never received an update: check that their gradients are not masked "
            "(ESFT's selection in finetune.json), that they are in the optimizer, and that the "
            "fine-tuning data reaches them (no routed token, no gradient)."
        )
        return Check(NAME, "problem", evidence, advice, data)
    if leaked:
        evidence = (
            "experts that ESFT was to keep frozen differ from the base: "
            + "; ".join(f"layer {k}: expert(s) {ids(v)}" for k, v in leaked.items())
            + "."
        )
        advice = (
            "ESFT restores frozen experts after every optimizer step; a custom loop that "
            "skips ExpertFreeze.attach(optimizer) lets weight decay move them."
        )
        return Check(NAME, "warning", evidence, advice, data)
    count = sum(len(v) for v in chosen.values())
    evidence = (
        f"{method} fine-tune: all {count} {what} expert(s) differ from the base {base_dir}"
        + (", and every frozen expert is unchanged." if method == "esft" else ".")
    )
    return Check(NAME, "ok", evidence, "", data)
