"""Experts that change during pre-training: experts added or split at scheduled steps
(`train.grow`), and dead experts recycled (`train.recycle_dead_every`).

An event at step s applies right after optimizer step s, through the same edit as `moekit
experts` (moekit.finetune.expert_edit): the model is rebuilt with the new expert count, the
weights edited (copies get `train.grow_noise`), and the optimizer's moments edited along with
the weights (a copy starts with its original's moments), so training goes on where it was.
Which experts are busiest is decided by the copies routed to each since the previous event
(or the start), counted from the training steps themselves; the counts are saved in every
checkpoint, so a resumed run makes the same choices. The model's config at step s is the
run's plus the grow events up to s (`config_at`): a resumed run builds it from there.

Specs (`train.grow`, one string each): "STEP:add=N" (copies of the N busiest experts of each
MoE layer) or "STEP:split=E,F" (a copy of the named experts in every MoE layer).

Recycling: every `recycle_dead_every` steps, an expert whose routed copies since the previous
check are below `recycle_dead_below` of the fair share (total / E) becomes a copy of one of the
busiest experts (in turn), with noise; the expert count stays.

A hierarchical model (`router="hierarchical"`) keeps its groups equal (moekit.finetune
.group_edit): "add=N" gives each of its G groups N / G copies of its own busiest experts, a
split must name as many experts in every group, and a dead expert becomes a copy of a busy
expert of its own group.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from moekit.config import ModelConfig, MoEConfig
from moekit.finetune.expert_edit import Plan, Source, edit_state, edited_config
from moekit.finetune.group_edit import Groups, busiest_in_groups, expert_groups, split_in_groups


@dataclass(frozen=True)
class GrowEvent:
    """At optimizer step `step`: add `add` copies of the busiest experts, or split `split`."""

    step: int
    add: int = 0
    split: tuple[int, ...] = ()


def parse_grow(specs: Iterable[str]) -> list[GrowEvent]:
    """`train.grow`'s specs as events in step order; a ValueError naming a malformed spec."""
    events = []
    for spec in specs:
        step_text, _, edit = str(spec).partition(":")
        kind, _, value = edit.partition("=")
        try:
            step = int(step_text)
            if step < 1:
                raise ValueError
            if kind == "add":
                event = GrowEvent(step, add=int(value))
                if event.add < 1:
                    raise ValueError
            elif kind == "split":
                event = GrowEvent(step, split=tuple(int(v) for v in value.split(",")))
            else:
                raise ValueError
        except ValueError:
            raise ValueError(
                f"train.grow: {spec!r} is invalid: write 'STEP:add=N' or 'STEP:split=E,F' "
                "(STEP >= 1)"
            ) from None
        events.append(event)
    steps = [e.step for e in events]
    if len(set(steps)) != len(steps):
        raise ValueError(f"train.grow: two events at one step in {list(specs)}")
    return sorted(events, key=lambda e: e.step)


def added(event: GrowEvent) -> int:
    return event.add or len(event.split)


def check_event_groups(event: GrowEvent, moe: MoEConfig, num_experts: int) -> None:
    """ValueError unless `event`, on `moe` with `num_experts` experts then, keeps the groups of
    a hierarchical router equal (as `plan_at` will plan it); nothing to check without groups."""
    groups = expert_groups(dataclasses.replace(moe, num_experts=num_experts))
    if groups.count == 1:
        return
    if event.add:
        busiest_in_groups({0: torch.zeros(num_experts)}, event.add, groups)
    else:
        split_in_groups([0], groups, {0: event.split})


def config_at(cfg: ModelConfig, events: Iterable[GrowEvent], step: int) -> ModelConfig:
    """The model's config after the grow events up to `step`."""
    grown = sum(added(e) for e in events if e.step <= step)
    if not grown or cfg.moe is None:
        return cfg
    moe = dataclasses.replace(cfg.moe, num_experts=cfg.moe.num_experts + grown)
    return dataclasses.replace(cfg, moe=moe)


class ExpertGrowth:
    """The grow schedule and recycling of one run: counts routed copies per layer from the
    training steps (`observe`), and at a step where an event or a recycling check falls due
    returns the plan (`plan_at`, which starts a fresh count) that `apply_plan` carries out on
    the model and its optimizer."""

    def __init__(self, events: list[GrowEvent], recycle_every: int, recycle_below: float) -> None:
        self.events = {e.step: e for e in events}
        self.recycle_every, self.recycle_below = recycle_every, recycle_below
        self.counts: dict[int, Tensor] = {}

    @property
    def active(self) -> bool:
        return bool(self.events) or self.recycle_every > 0

    def observe(self, layer: int, routed: Tensor) -> None:
        routed = routed.detach().to("cpu", torch.long)
        if layer in self.counts and self.counts[layer].shape == routed.shape:
            self.counts[layer] += routed
        else:
            self.counts[layer] = routed.clone()

    def plan_at(self, step: int, cfg: ModelConfig) -> tuple[str, Plan] | None:
        """What falls due after optimizer step `step` of a model with config `cfg`: a line
        saying what, and the plan; None when nothing does (or no expert is dead)."""
        assert cfg.moe is not None
        layers, n, groups = cfg.moe_layers, cfg.moe.num_experts, expert_groups(cfg.moe)
        counts = {
            layer: self.counts.get(layer, torch.zeros(n, dtype=torch.long)) for layer in layers
        }
        event = self.events.get(step)
        if event is not None or (self.recycle_every and step % self.recycle_every == 0):
            self.counts.clear()  # the next choice counts from here
        if event is not None:
            ids = (
                busiest_in_groups(counts, event.add, groups)
                if event.add
                else {layer: list(event.split) for layer in layers}
            )
            what = (
                f"added copies of experts {ids}"
                if event.add
                else f"split experts {list(event.split)}"
            )
            line = f"step {step}: {what}; {n + added(event)} experts per MoE layer"
            return line, split_in_groups(layers, groups, ids)
        if self.recycle_every and step % self.recycle_every == 0:
            plan, recycled = _recycle_plan(counts, groups, self.recycle_below)
            if recycled:
                return f"step {step}: recycled dead experts {recycled} as copies of busy ones", plan
        return None

    def state_dict(self) -> dict[str, Any]:
        return {str(k): v.tolist() for k, v in self.counts.items()}

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        self.counts = {int(k): torch.tensor(v, dtype=torch.long) for k, v in (state or {}).items()}


def _recycle_plan(
    counts: dict[int, Tensor], groups: Groups, below: float
) -> tuple[Plan, dict[int, list[int]]]:
    """Per layer: the dead experts (below `below` of the fair share) replaced by copies of
    the busiest experts of their own group, in turn (a group with no live expert keeps its
    experts: the group router, not they, decides that no token goes there); and the
    recycled ones by layer."""
    n = groups.num_experts
    plan: Plan = {}
    recycled: dict[int, list[int]] = {}
    for layer, c in counts.items():
        total = int(c.sum())
        dead = [e for e in range(n) if total and c[e] < below * total / n]
        order = [e for e in c.argsort(descending=True, stable=True).tolist() if e not in dead]
        sources = [Source((e,)) for e in range(n)]
        done = []
        for g in range(groups.count):
            live = [e for e in order if groups.of(e) == g]
            mine = [d for d in dead if groups.of(d) == g] if live else []
            for i, d in enumerate(mine):
                sources[d] = Source((live[i % len(live)],), copy=True)
            done += mine
        plan[layer] = sources
        if done:
            recycled[layer] = done
    return plan, recycled


def apply_plan(
    model: nn.Module, optimizer: torch.optim.Optimizer, plan: Plan, *, noise: float, seed: int
) -> tuple[ModelConfig, dict[str, Tensor], dict[str, dict[str, Any]]]:
    """The edited config, weights and per-parameter optimizer state (by parameter name) of
    `model` under `plan`; the caller builds the new model and optimizer from them."""
    cfg: ModelConfig = model.cfg  # type: ignore[assignment]
    new_cfg = edited_config(cfg, plan)
    weights = edit_state(model.state_dict(), cfg, plan, noise=noise, seed=seed)
    moments: dict[str, dict[str, Any]] = {}
    for name, p in model.named_parameters():
        state = optimizer.state.get(p)
        if not state:
            continue
        per_name: dict[str, Any] = {}
        for key, value in state.items():
            if isinstance(value, Tensor) and value.shape == p.shape:
                # The moments move with the weights, exactly (no noise on them).
                per_name[key] = edit_state({name: value}, cfg, plan)[name]
            else:
                per_name[key] = value
        moments[name] = per_name
    return new_cfg, weights, moments


def load_moments(
    model: nn.Module, optimizer: torch.optim.Optimizer, moments: dict[str, dict[str, Any]]
) -> None:
    """Put the edited per-parameter state into the new optimizer of the new model."""
    for name, p in model.named_parameters():
        if name in moments:
            optimizer.state[p] = {
                k: v.to(p.device) if isinstance(v, Tensor) else v for k, v in moments[name].items()
            }
