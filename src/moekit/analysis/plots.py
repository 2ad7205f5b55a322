"""The figures of `moekit analyze`, drawn from an `Analysis` into PNG files.

The load heatmap is the shared one (`moekit.report.plots.expert_load`, as in the training
report); the others are particular to the analysis. matplotlib is imported only when a figure
is drawn.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from moekit.analysis.result import (
    Analysis,
    CoactivationSection,
    ConsistencySection,
    SpecialisationSection,
)
from moekit.report import plots

MAX_PLOTTED_LAYERS = 8  # per-layer figures show at most this many layers, evenly spaced
PLOTS = {
    "load": "load.png",
    "classes": "classes.png",
    "domains": "domains.png",
    "specialisation": "specialisation.png",
    "consistency": "consistency.png",
    "coactivation": "coactivation.png",
}


def write_plots(result: Analysis, out: Path) -> list[str]:
    """Draw every figure of `result` into the folder `out`; returns their file names."""
    plots.expert_load({i: v.share for i, v in result.load.layers.items()}, out / PLOTS["load"])
    spec = result.specialisation
    for kind, section in (("class", spec.by_class), ("domain", spec.by_domain)):
        distributions(
            {i: v.distribution for i, v in section.layers.items()},
            section.labels,
            f"Where each {kind} goes: share of its expert choices (rows sum to 1)",
            out / PLOTS["classes" if kind == "class" else "domains"],
        )
    specialisation(spec, out / PLOTS["specialisation"])
    consistency(result.consistency, out / PLOTS["consistency"])
    coactivation(result.coactivation, out / PLOTS["coactivation"])
    return list(PLOTS.values())


def plotted_layers(layers: Sequence[int]) -> list[int]:
    """At most `MAX_PLOTTED_LAYERS` of `layers`, evenly spaced, first and last included."""
    if len(layers) <= MAX_PLOTTED_LAYERS:
        return list(layers)
    step = (len(layers) - 1) / (MAX_PLOTTED_LAYERS - 1)
    return [layers[round(i * step)] for i in range(MAX_PLOTTED_LAYERS)]


def _grid(n: int, width: float, height: float) -> tuple[Any, list[Any]]:
    """A figure of n panels, two per row, each `width` x `height` inches."""
    plt = plots.pyplot()
    cols = min(n, 2)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False)
    flat = list(axes.flat)
    for ax in flat[n:]:
        ax.axis("off")
    return fig, flat[:n]


def _max(grid: list[list[float]]) -> float:
    return max((v for row in grid for v in row), default=0.0)


def _save(fig: Any, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plots.pyplot().close(fig)


def distributions(
    layers: dict[int, list[list[float]]], labels: list[str], title: str, path: Path
) -> None:
    """Per layer, a (label x expert) heatmap of where each label's expert choices go."""
    shown = plotted_layers(list(layers))
    num_experts = len(layers[shown[0]][0])
    fig, axes = _grid(len(shown), max(3.6, 0.32 * num_experts + 1.8), 0.32 * len(labels) + 1.4)
    for ax, layer in zip(axes, shown, strict=True):
        grid = layers[layer]
        im = ax.imshow(grid, aspect="auto", cmap="magma", vmin=0, vmax=max(0.01, _max(grid)))
        ax.set_title(f"layer {layer}", fontsize=10)
        ax.set_yticks(range(len(labels)), labels, fontsize=8)
        ax.set_xticks(range(num_experts), [str(e) for e in range(num_experts)], fontsize=7)
        ax.set_xlabel("expert", fontsize=8)
        fig.colorbar(im, ax=ax, fraction=0.04)
    fig.suptitle(title, fontsize=11)
    _save(fig, path)


def specialisation(spec: SpecialisationSection, path: Path) -> None:
    """NMI per layer next to its shuffled-label baseline, by token class and by domain."""
    fig, axes = plots.pyplot().subplots(1, 2, figsize=(11, 3.8))
    for ax, kind, section in zip(
        axes, ("class", "domain"), (spec.by_class, spec.by_domain), strict=True
    ):
        names = list(section.layers)
        x = list(range(len(names)))
        real = [section.layers[i].nmi for i in names]
        base = [section.layers[i].baseline_mean for i in names]
        spread = [section.layers[i].baseline_std for i in names]
        ax.bar([v - 0.2 for v in x], real, 0.4, label="real labels", color="#3b6fb6")
        ax.bar([v + 0.2 for v in x], base, 0.4, yerr=spread, label="shuffled labels (chance)",
               color="#bbbbbb", capsize=3)  # fmt: skip
        ax.set_xticks(x, [f"layer {i}" for i in names], fontsize=8)
        ax.set_ylabel("I(E;C) / H(C)")
        ax.set_title(f"Specialisation by {kind}")
        ax.set_ylim(0, max(0.05, *real, *base) * 1.25)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8)
    _save(fig, path)


_CONSISTENCY_BARS = (
    ("paraphrase_weighted", "paraphrases", "#3b6fb6"),
    ("same_category_weighted", "unrelated, same category", "#8c8c8c"),
    ("unrelated_weighted", "unrelated", "#c8c8c8"),
    ("paraphrase_jaccard", "paraphrases (sets)", "#9ab8e0"),
    ("unrelated_jaccard", "unrelated (sets)", "#e6e6e6"),
)


def consistency(section: ConsistencySection, path: Path) -> None:
    """Per group of pairs and layer, paraphrase overlap against the unrelated references."""
    groups = section.groups
    fig, axes = plots.pyplot().subplots(
        1, len(groups), figsize=(5.5 * len(groups), 3.8), squeeze=False
    )
    for ax, (group, g) in zip(axes[0], groups.items(), strict=True):
        names = list(g.layers)
        x = list(range(len(names)))
        width = 0.16
        for n, (key, label, colour) in enumerate(_CONSISTENCY_BARS):
            values = [getattr(g.layers[i], key) or 0.0 for i in names]
            dx = (n - (len(_CONSISTENCY_BARS) - 1) / 2) * width
            ax.bar([v + dx for v in x], values, width, label=label, color=colour)
        ax.set_xticks(x, [f"layer {i}" for i in names], fontsize=8)
        ax.set_ylim(0, 1.4)
        ax.set_yticks([0, 0.2, 0.4, 0.6, 0.8, 1.0])
        ax.set_ylabel("overlap of experts used")
        ax.set_title(f"Consistency ({group} pairs: {g.pairs})")
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=7, loc="upper center", ncol=3)
    _save(fig, path)


def coactivation(section: CoactivationSection, path: Path) -> None:
    """Per layer, the matrix P(j chosen | i chosen)."""
    layers = section.layers
    shown = plotted_layers(list(layers))
    num_experts = len(layers[shown[0]].conditional)
    size = max(3.2, 0.3 * num_experts + 1.5)
    fig, axes = _grid(len(shown), size + 0.6, size)
    for ax, layer in zip(axes, shown, strict=True):
        grid = layers[layer].conditional
        im = ax.imshow(grid, cmap="viridis", vmin=0, vmax=max(0.01, _max(grid)))
        ax.set_title(f"layer {layer}", fontsize=10)
        ticks = range(0, num_experts, max(1, num_experts // 16))
        ax.set_xticks(list(ticks), [str(t) for t in ticks], fontsize=7)
        ax.set_yticks(list(ticks), [str(t) for t in ticks], fontsize=7)
        ax.set_xlabel("expert j", fontsize=8)
        ax.set_ylabel("expert i", fontsize=8)
        fig.colorbar(im, ax=ax, fraction=0.046)
    uniform = section.uniform_conditional
    fig.suptitle(f"P(j chosen | i chosen); uniform random routing gives {uniform:.3f}", fontsize=11)
    _save(fig, path)
