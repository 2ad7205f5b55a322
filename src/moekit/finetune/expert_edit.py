"""Experts added, split, merged and removed in a trained model: edits of a model directory that
keep everything that is indexed by expert consistent (the config's `num_experts`, the stacked
expert weights and biases, the router's rows, logit bias and selection bias, and a LoRA
adapter's per-expert matrices and its router rows), without an optimizer.

An edit is a plan: for each MoE layer, the list of its new experts, each made from old ones
(`Source`):
- kept: expert e as it was;
- a copy of e (adding, splitting): e's weights times (1 + noise * N(0, 1)), e's router row;
  with a router logit bias, e and its copies share e's probability: each of the n parts gets
  bias - ln(n), so under softmax scoring every other expert's probability is unchanged and the
  parts' probabilities sum to e's (without a logit bias a row cannot be shifted: the copies'
  rows are e's, and each copy scores as e does);
- a merge of several experts: the mean of their weights (or a weighted mean), the mean of
  their router rows and selection biases (a logit bias: the mean plus ln(n), so the merged
  expert's softmax probability is that of n experts at the mean logit).

A hierarchical model's experts form equal groups with a group router of their own: its
plans keep every expert inside its group and the groups equal (moekit.finetune.group_edit,
checked again by `edited_config`); the group router is not touched.

An adapter's update of a kept or copied expert moves with it; a merged expert carries none
(its mask is 0): its merged weights already hold what its parts' updates added.

What a top-k layer computes changes with any edit that changes which experts a token chooses:
`moekit experts` reports, on calibration text, the loss before and after (docs/finetuning.md).
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from moekit.config import ModelConfig, MoEConfig
from moekit.model_dir import ModelDir

EXPERT_TENSORS = ("w_gate", "w_up", "w_down", "b_gate", "b_up", "b_down")
ROUTER_TENSORS = ("weight", "bias", "selection_bias")
# A hierarchical router's group router: indexed by group, so an edit leaves it as it is.
GROUP_TENSORS = ("group_weight", "group_selection_bias")


@dataclass(frozen=True)
class Source:
    """What one new expert is made of: the old experts `ids` (one: kept or copied; several:
    merged, by the mean, or by `weights` when given); `copy`: a copy of `ids[0]`."""

    ids: tuple[int, ...]
    copy: bool = False
    weights: tuple[float, ...] | None = None

    @property
    def merged(self) -> bool:
        return len(self.ids) > 1


# The new experts of each MoE layer, by layer index.
Plan = dict[int, list[Source]]


def check_editable(cfg: ModelConfig, where: str) -> MoEConfig:
    """The MoE config of a model whose experts can be edited; a ValueError naming why not."""
    if cfg.moe is None:
        raise ValueError(f"{where} is a dense model: it has no experts to edit")
    if cfg.quantization is not None:
        raise ValueError(
            f"{where} is quantised (int{cfg.quantization.bits}): its experts cannot be edited "
            "without dequantising; edit the model it was quantised from"
        )
    return cfg.moe


@dataclass(frozen=True)
class Groups:
    """The groups of a layer's experts: `count` groups of `size` experts each, of which a
    token takes `per_token` in each group it chooses."""

    count: int
    size: int
    per_token: int

    @property
    def num_experts(self) -> int:
        return self.count * self.size

    def of(self, expert: int) -> int:
        return expert // self.size

    def members(self, group: int) -> range:
        return range(group * self.size, (group + 1) * self.size)


def expert_groups(moe: MoEConfig) -> Groups:
    """The groups an edit must respect: the router's groups, or one group of every expert."""
    if moe.router != "hierarchical":
        return Groups(1, moe.num_experts, moe.top_k)
    size = moe.num_experts // moe.router_groups
    return Groups(moe.router_groups, size, moe.top_k // moe.group_top_k)


def check_group_plan(plan: Plan, groups: Groups) -> None:
    """ValueError unless each layer's new experts form `groups.count` equal contiguous groups,
    each made only of experts of the same group of the old layer."""
    if groups.count == 1:
        return
    for layer, sources in sorted(plan.items()):
        size, rest = divmod(len(sources), groups.count)
        if rest or not size:
            raise ValueError(
                f"layer {layer}: the edit leaves {len(sources)} experts, which the "
                f"{groups.count} expert groups cannot share equally"
            )
        for i, s in enumerate(sources):
            old = sorted({groups.of(e) for e in s.ids})
            if old != [i // size]:
                raise ValueError(
                    f"layer {layer}: new expert {i} would sit in group {i // size} but is made "
                    f"of experts {list(s.ids)} of group(s) {old}; a hierarchical model's "
                    "experts stay in their group"
                )


def edited_config(cfg: ModelConfig, plan: Plan) -> ModelConfig:
    """`cfg` with the plan's number of experts; a ValueError naming what an edit breaks
    (fewer experts than top-k, a group count that no longer divides them, a plan that
    leaves the layers with different numbers)."""
    moe = check_editable(cfg, "the model")
    counts = {layer: len(sources) for layer, sources in plan.items()}
    if sorted(counts) != sorted(cfg.moe_layers):
        raise ValueError(
            f"the plan covers layers {sorted(counts)}, the MoE layers are {cfg.moe_layers}"
        )
    sizes = set(counts.values())
    if len(sizes) != 1:
        raise ValueError(
            f"every MoE layer must keep the same number of experts; the edit gives {counts}"
        )
    n = sizes.pop()
    if n < moe.top_k:
        raise ValueError(
            f"the edit leaves {n} experts per layer, fewer than top_k={moe.top_k}: every token "
            "picks top_k experts"
        )
    if n % moe.num_groups:
        raise ValueError(
            f"the edit leaves {n} experts per layer, which num_groups={moe.num_groups} does not "
            "divide (group-limited routing splits the experts into equal groups)"
        )
    check_group_plan(plan, expert_groups(moe))
    try:
        return dataclasses.replace(cfg, moe=dataclasses.replace(moe, num_experts=n))
    except ValueError as e:
        raise ValueError(f"the edited model's config is invalid: {e}") from None


def _combine(
    stack: Tensor, sources: Sequence[Source], noise: float, gen: torch.Generator | None
) -> Tensor:
    """The new stack (first dimension: experts) the sources make of `stack`."""
    rows = []
    for s in sources:
        if s.merged:
            w = torch.tensor(s.weights or [1.0] * len(s.ids), dtype=torch.float64)
            w = (w / w.sum()).to(stack.dtype).view(-1, *([1] * (stack.dim() - 1)))
            rows.append((stack[list(s.ids)] * w).sum(dim=0))
            continue
        row = stack[s.ids[0]].clone()
        if s.copy and noise and gen is not None:
            row = row * (
                1 + noise * torch.randn(row.shape, generator=gen, dtype=torch.float32).to(row.dtype)
            )
        rows.append(row)
    return torch.stack(rows)


def _router_bias(bias: Tensor, sources: Sequence[Source]) -> Tensor:
    """The new logit bias: copies share their original's probability, merges sum theirs."""
    parts = [0] * bias.shape[0]
    for s in sources:
        if not s.merged:
            parts[s.ids[0]] += 1
    out = []
    for s in sources:
        if s.merged:
            out.append(bias[list(s.ids)].mean() + math.log(len(s.ids)))
        else:
            out.append(bias[s.ids[0]] - math.log(parts[s.ids[0]]))
    return torch.stack(out).to(bias.dtype)


def edit_state(
    state: Mapping[str, Tensor], cfg: ModelConfig, plan: Plan, *, noise: float = 0.0, seed: int = 0
) -> dict[str, Tensor]:
    """The weights of the edited model (see the module docstring); tensors of other layers
    and of the shared experts are the same objects. An expert tensor this module does not
    know is a ValueError naming it (it would be left inconsistent)."""
    check_editable(cfg, "the model")
    if noise < 0:
        raise ValueError(f"noise={noise} is invalid: must be >= 0")
    gen = torch.Generator().manual_seed(seed)
    out = dict(state)
    for layer in sorted(plan):
        sources, prefix = plan[layer], f"layers.{layer}.ffn"
        known = {f"{prefix}.experts.{n}" for n in EXPERT_TENSORS}
        known |= {f"{prefix}.router.{n}" for n in ROUTER_TENSORS + GROUP_TENSORS}
        unknown = sorted(
            k for k in state
            if k.startswith((f"{prefix}.experts.", f"{prefix}.router.")) and k not in known
        )  # fmt: skip
        if unknown:
            raise ValueError(f"cannot edit the experts of a model with tensors {unknown[:3]}")
        for name in EXPERT_TENSORS:
            key = f"{prefix}.experts.{name}"
            if key in state:
                out[key] = _combine(state[key], sources, noise, gen)
        for name in ("weight", "selection_bias"):
            key = f"{prefix}.router.{name}"
            if key in state:
                out[key] = _combine(state[key], sources, 0.0, None)
        key = f"{prefix}.router.bias"
        if key in state:
            out[key] = _router_bias(state[key], sources)
    return out


def edit_adapter_state(state: Mapping[str, Tensor], plan: Plan) -> dict[str, Tensor]:
    """A LoRA adapter's tensors for the edited model: each expert's A, B and mask move with
    it (a merged expert gets B = 0 and mask 0), the router adapter's B rows as the router's."""
    out = dict(state)
    for layer, sources in plan.items():
        prefix = f"layers.{layer}.ffn"
        for key, t in state.items():
            if key.startswith(f"{prefix}.experts.adapters."):
                new = _combine(t, sources, 0.0, None)
                merged = torch.tensor([s.merged for s in sources])
                if key.endswith((".B", ".mask")):
                    new[merged] = 0
                out[key] = new
            elif key == f"{prefix}.router.adapter.B":
                out[key] = _combine(t, sources, 0.0, None)
    return out


def check_out_dir(src_dir: str | Path, out_dir: str | Path) -> None:
    """ValueError unless `out_dir` can take the edited model: not the source, no model yet."""
    if Path(out_dir).resolve() == Path(src_dir).resolve():
        raise ValueError("the edited model needs its own directory: --out is the source")
    ModelDir(out_dir).refuse_overwrite("the edited model")


def write_edited(
    src_dir: str | Path, out_dir: str | Path, plan: Plan, *, noise: float = 0.0, seed: int = 0,
    summary: Mapping[str, Any] | None = None,
) -> ModelConfig:  # fmt: skip
    """Edit the model in `src_dir` by `plan` into the new directory `out_dir` (weights, config,
    tokenizer and chat files, the adapter when there is one, and `experts_edit.json` with
    `summary`); returns the edited config. Everything is checked before anything is written,
    and `src_dir` is only read."""
    src, out = ModelDir(src_dir).require_model("the model to edit"), ModelDir(out_dir)
    check_out_dir(src_dir, out_dir)
    cfg = src.config()
    new_cfg = edited_config(cfg, plan)
    state = edit_state(src.load_weights(), cfg, plan, noise=noise, seed=seed)
    adapter = _edited_adapter(src, plan, new_cfg)
    out.path.mkdir(parents=True, exist_ok=True)
    out.save_weights(state)
    out.save_config(new_cfg)
    for path in src.tokenizer_files():  # tokenizer, chat template, generation defaults
        shutil.copyfile(path, out.path / path.name)
    if adapter is not None:
        _write_adapter(out.adapter_dir, *adapter)
    record = {"source": str(src_dir), "experts": new_cfg.moe.num_experts if new_cfg.moe else 0}
    record["layers"] = {str(k): [dataclasses.asdict(s) for s in v] for k, v in plan.items()}
    (out.path / "experts_edit.json").write_text(
        json.dumps({**record, **(summary or {})}, indent=2) + "\n"
    )
    return new_cfg


def _edited_adapter(
    src: ModelDir, plan: Plan, new_cfg: ModelConfig
) -> tuple[dict[str, Tensor], dict[str, Any]] | None:
    """The source's LoRA adapter edited along (tensors, adapter_config), or None."""
    if not src.adapter_dir.is_dir():
        return None
    from safetensors.torch import load_file

    from moekit.finetune.lora import ADAPTER_WEIGHTS, read_adapter_config

    config = read_adapter_config(src.adapter_dir)
    state = load_file(str(src.adapter_dir / ADAPTER_WEIGHTS))
    # Which experts are adapted now differs per layer: the masks say it, not one list.
    config["lora"] = {**config["lora"], "experts": None}
    config["base_config"] = new_cfg.to_dict()
    return edit_adapter_state(state, plan), config


def _write_adapter(directory: Path, state: dict[str, Tensor], config: dict[str, Any]) -> None:
    from moekit.files import atomic_write_text
    from moekit.finetune.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS
    from moekit.model_dir import save_weights

    directory.mkdir(parents=True, exist_ok=True)
    save_weights({k: v.contiguous() for k, v in state.items()}, directory)
    (directory / ModelDir.WEIGHTS).rename(directory / ADAPTER_WEIGHTS)
    atomic_write_text(directory / ADAPTER_CONFIG, json.dumps(config, indent=2) + "\n")


# ---- plans ------------------------------------------------------------------------------------


def check_ids(ids: Sequence[int], num_experts: int, what: str) -> None:
    bad = [e for e in ids if not 0 <= e < num_experts]
    if bad:
        raise ValueError(
            f"{what}: experts {bad} do not exist (the model has 0 .. {num_experts - 1})"
        )
    if len(set(ids)) != len(ids):
        raise ValueError(f"{what}: an expert is named twice in {list(ids)}")


def check_merge(group: Sequence[int], num_experts: int) -> None:
    """ValueError unless `group` names two or more distinct experts that exist."""
    if len(group) < 2:
        raise ValueError(f"merging needs two experts or more, got {list(group)}")
    if len(set(group)) != len(group):
        raise ValueError(f"merging an expert with itself: {list(group)} names one twice")
    check_ids(group, num_experts, "merging")


def split_plan(layers: Sequence[int], num_experts: int, ids: Mapping[int, Sequence[int]]) -> Plan:
    """Every expert kept, then one copy of each of `ids[layer]` (the same count per layer)."""
    plan: Plan = {}
    for layer in layers:
        chosen = list(ids[layer])
        check_ids(chosen, num_experts, "splitting")
        plan[layer] = [Source((e,)) for e in range(num_experts)]
        plan[layer] += [Source((e,), copy=True) for e in chosen]
    return plan


def busiest(frequency: Mapping[int, Tensor], n: int) -> dict[int, list[int]]:
    """The `n` experts of each layer that the most copies went to."""
    num_experts = next(iter(frequency.values())).numel()
    if not 1 <= n <= num_experts:
        raise ValueError(
            f"adding {n} experts is invalid: each is a copy of one of the {num_experts} "
            f"busiest experts, so add 1 .. {num_experts} at a time"
        )
    return {
        layer: f.argsort(descending=True, stable=True)[:n].tolist()
        for layer, f in frequency.items()
    }


def prune_plan(scores: Mapping[int, Tensor], keep: int, top_k: int) -> Plan:
    """The `keep` highest-scoring experts of each layer, in their order."""
    num_experts = next(iter(scores.values())).numel()
    if keep < top_k:
        raise ValueError(
            f"pruning to {keep} experts is below top_k={top_k}: every token picks top_k experts"
        )
    if keep >= num_experts:
        raise ValueError(f"pruning to {keep} experts removes none: the model has {num_experts}")
    plan: Plan = {}
    for layer, s in scores.items():
        kept = sorted(s.argsort(descending=True, stable=True)[:keep].tolist())
        plan[layer] = [Source((e,)) for e in kept]
    return plan


def merge_plan(layers: Sequence[int], num_experts: int, group: Sequence[int]) -> Plan:
    """In every layer, the experts of `group` merged into one at the place of the first."""
    check_merge(group, num_experts)
    first, rest = min(group), set(group) - {min(group)}
    sources = [
        Source(tuple(sorted(group))) if e == first else Source((e,))
        for e in range(num_experts)
        if e not in rest
    ]
    return {layer: list(sources) for layer in layers}
