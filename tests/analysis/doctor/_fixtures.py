"""Builders for the doctor tests: copies of a small model directory with one fault planted."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from moekit.analysis.doctor import Check, diagnose
from moekit.model_dir import load_weights, save_weights

from ...conftest import TINY_RUN

# A training run small enough for a few dozen steps in seconds: the trainer tests' tiny run
# with 8 experts, evaluated rarely.
TINY_TRAIN = [
    *TINY_RUN,
    "model.moe.num_experts=8",
    "train.eval_every=100",
    "train.eval_batches=1",
    "train.log_every=2",
]

# Fewer sample tokens where a test does not look at the routing checks.
FAST = {"sample_tokens": 512}

# Every check, in the order the doctor reports them.
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
    "dead_groups",
]


def copy_model(src: Path, dst: Path) -> Path:
    """A copy of the model files of `src` (config, weights, tokenizer) in `dst`."""
    dst.mkdir(parents=True, exist_ok=True)
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)
    return dst


def edit_weights(directory: Path, edit: Callable[[dict[str, torch.Tensor]], None]) -> None:
    """Load the weights of `directory`, let `edit` change the dict in place, save them back."""
    state = {k: v.clone() for k, v in load_weights(directory).items()}
    edit(state)
    save_weights(state, directory)


def copy_expert(state: dict[str, torch.Tensor], *, layer: int, src: int, dst: int) -> None:
    """Make expert `dst` of `layer` a copy of expert `src` (all three projections)."""
    for proj in ("w_gate", "w_up", "w_down"):
        w = state[f"layers.{layer}.ffn.experts.{proj}"]
        w[dst] = w[src]


def edit_moe_config(directory: Path, **changes: Any) -> None:
    """Change fields of the `moe` section of `directory`'s config.json."""
    path = directory / "config.json"
    data = json.loads(path.read_text())
    data["moe"].update(changes)
    path.write_text(json.dumps(data, indent=2))


def add_selection_bias(directory: Path, values: dict[int, torch.Tensor], **moe: Any) -> None:
    """Give every MoE layer of `directory` a selection bias (zeros unless `values` names the
    layer) and switch the config to one (`moe` overrides, default a fixed imported bias)."""
    edit_moe_config(directory, **({"selection_bias": True} | moe))
    cfg = json.loads((directory / "config.json").read_text())

    def edit(state: dict[str, torch.Tensor]) -> None:
        for i in range(cfg["num_layers"]):
            state[f"layers.{i}.ffn.router.selection_bias"] = values.get(
                i, torch.zeros(cfg["moe"]["num_experts"])
            )

    edit_weights(directory, edit)


def write_metrics(directory: Path, dead_by_record: list[dict[str, int]]) -> None:
    """A metrics.jsonl with one training record per entry, each layer's dead count as given."""
    lines = []
    for n, dead in enumerate(dead_by_record, start=1):
        routing = {
            layer: {"imbalance": 1.1, "cv": 0.05, "dead": d, "dropped": 0, "entropy": 1.9}
            for layer, d in dead.items()
        }
        lines.append(json.dumps({"kind": "train", "step": 10 * n, "loss": 3.0, "routing": routing}))
        lines.append(json.dumps({"kind": "eval", "step": 10 * n, "val_loss": 3.2}))
    (directory / "metrics.jsonl").write_text("\n".join(lines) + "\n")


def write_checkpoint(run_dir: Path, step: int, state: dict[str, torch.Tensor]) -> Path:
    """A train_state/step-N checkpoint holding `state` (the weights are all the doctor reads)."""
    path = run_dir / "train_state" / f"step-{step:08d}"
    save_weights(state, path)
    (path / "state.json").write_text(json.dumps({"step": step}))
    (run_dir / "train_state" / "latest").write_text(path.name + "\n")
    return path


def checks_of(directory: Path, **kwargs: Any) -> dict[str, Check]:
    """`diagnose(directory)`, by check name."""
    return {c.name: c for c in diagnose(directory, **kwargs)}


def not_ok(checks: dict[str, Check]) -> dict[str, str]:
    """The checks that are not ok, with their evidence (for assertion messages)."""
    return {n: f"{c.status}: {c.evidence}" for n, c in checks.items() if c.status != "ok"}
