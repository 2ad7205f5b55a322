"""Calibrated expert edits (`moekit experts`): measure every expert on calibration text
(moekit.analysis.expert_importance), plan the edit from the measurements, write the edited
model (moekit.finetune.expert_edit), and measure the loss on the same text before and after.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from moekit.analysis.analyze import text_documents
from moekit.analysis.expert_importance import CRITERIA, ExpertImportance, expert_importance
from moekit.analysis.routing import sample_tokens
from moekit.config import ModelConfig
from moekit.data.tokenizer import Tokenizer
from moekit.finetune.expert_edit import (
    Plan,
    check_editable,
    check_out_dir,
    edited_config,
    write_edited,
)
from moekit.finetune.group_edit import (
    busiest_in_groups,
    expert_groups,
    merge_in_groups,
    prune_in_groups,
    split_in_groups,
)
from moekit.model_dir import ModelDir, load_model

EDITS = ("add", "split", "merge", "prune", "prune_to")


@dataclass
class ExpertEdit:
    """One edit: `kind` in EDITS and its argument (a count, or expert ids; a merge of several
    sets at once: `sets`, each merged into one expert)."""

    kind: str
    count: int = 0
    ids: list[int] = field(default_factory=list)
    sets: list[list[int]] = field(default_factory=list)


@dataclass
class EditResult:
    """What an edit did: experts per layer before and after, the plan's kept/copied/merged
    experts per layer, the calibration measurements and the loss before and after."""

    out_dir: Path
    experts_before: int
    experts_after: int
    criterion: str | None
    before: ExpertImportance
    loss_after: float
    plan: Plan

    def to_dict(self) -> dict[str, Any]:
        return {
            "out": str(self.out_dir),
            "experts_before": self.experts_before,
            "experts_after": self.experts_after,
            "criterion": self.criterion,
            "calibration_tokens": self.before.tokens,
            "loss_before": self.before.loss,
            "loss_after": self.loss_after,
            "kept": {
                str(k): [s.ids[0] for s in v if not s.copy and not s.merged]
                for k, v in self.plan.items()
            },
            "importance": self.before.to_dict(),
        }


def plan_edit(
    cfg: ModelConfig, edit: ExpertEdit, importance: ExpertImportance, criterion: str
) -> Plan:
    """The plan of `edit` on a model of config `cfg`, from the measured `importance`; a
    hierarchical model's by its groups' rules (moekit.finetune.group_edit)."""
    moe = check_editable(cfg, "the model")
    layers, n, groups = cfg.moe_layers, moe.num_experts, expert_groups(moe)
    if edit.kind == "add":
        return split_in_groups(
            layers, groups, busiest_in_groups(importance.frequency, edit.count, groups)
        )
    if edit.kind == "split":
        return split_in_groups(layers, groups, {layer: edit.ids for layer in layers})
    if edit.kind == "merge":
        return merge_in_groups(layers, groups, edit.sets or [edit.ids])
    if edit.kind in ("prune", "prune_to"):
        keep = n - edit.count if edit.kind == "prune" else edit.count
        if edit.kind == "prune" and not 1 <= edit.count < n:
            raise ValueError(f"pruning {edit.count} experts is invalid: the model has {n}")
        if edit.kind == "prune" and edit.count % groups.count:
            raise ValueError(
                f"pruning {edit.count} experts is invalid: the {groups.count} expert groups "
                f"must stay equal, so prune a multiple of {groups.count}"
            )
        return prune_in_groups(importance.scores(criterion), keep, groups, moe.top_k)
    raise ValueError(f"edit {edit.kind!r} is unknown: choose from {', '.join(EDITS)}")


def edit_experts(
    model_dir: str | Path,
    out_dir: str | Path,
    edit: ExpertEdit,
    *,
    criterion: str = "reap",
    data: str | None = None,
    calibration_tokens: int = 16_384,
    seq_len: int = 256,
    batch_size: int = 8,
    noise: float = 0.0,
    seed: int = 0,
    progress: Callable[[int, int], None] | None = None,
) -> EditResult:
    """Edit the experts of the model in `model_dir` into `out_dir` (see the module docstring).
    The calibration text is `data` (read as `DataConfig.source` reads it) or the builtin
    corpus' validation split. Every check (the edit, the ids, the edited config, the output
    directory) runs before anything is written."""
    if criterion not in CRITERIA:
        raise ValueError(f"criterion={criterion!r} is invalid: choose from {', '.join(CRITERIA)}")
    src = ModelDir(model_dir).require_model("the model to edit")
    cfg = src.config()
    check_editable(cfg, str(model_dir))
    check_out_dir(model_dir, out_dir)  # before the calibration, which takes a while
    edited_config(cfg, plan_edit(cfg, edit, _unmeasured(cfg), criterion))  # likewise
    tokenizer = Tokenizer.load(src.path)
    docs, _ = text_documents(src.path, data, "text", None)
    ids = sample_tokens(docs, tokenizer, calibration_tokens).ids
    model = load_model(src.path)
    before = expert_importance(
        model, ids, seq_len=seq_len, batch_size=batch_size, progress=progress
    )
    plan = plan_edit(cfg, edit, before, criterion)
    new_cfg = edited_config(cfg, plan)  # checked before writing
    summary = {"edit": edit.kind, "criterion": criterion, "noise": noise, "seed": seed}
    write_edited(src.path, out_dir, plan, noise=noise, seed=seed, summary=summary)
    del model
    after = expert_importance(
        load_model(Path(out_dir)), ids, seq_len=seq_len, batch_size=batch_size
    )
    assert new_cfg.moe is not None and cfg.moe is not None
    used = criterion if edit.kind in ("prune", "prune_to") else None
    return EditResult(
        Path(out_dir), cfg.moe.num_experts, new_cfg.moe.num_experts, used, before, after.loss, plan
    )


def _unmeasured(cfg: ModelConfig) -> ExpertImportance:
    """Measurements of nothing: enough to check an edit's arguments before calibrating."""
    n = check_editable(cfg, "the model").num_experts
    zeros = {layer: torch.zeros(n, dtype=torch.long) for layer in cfg.moe_layers}
    return ExpertImportance(0, zeros, {k: v.double() for k, v in zeros.items()}, 0.0)


def parse_ids(text: str) -> list[int]:
    """ "3,5" -> [3, 5]; a ValueError naming the text otherwise."""
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"{text!r} is not a comma-separated list of expert ids") from None
