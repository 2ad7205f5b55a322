"""The plots the reports share, written as PNG files (matplotlib on its file-only Agg
backend, imported only when a plot is drawn)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def loss_curves(records: list[dict[str, Any]], path: Path) -> None:
    """Training and validation loss against tokens, and validation loss per domain, from a
    run's metrics records."""
    plt = pyplot()

    train = [r for r in records if r.get("kind") == "train"]
    evals = [r for r in records if r.get("kind") == "eval"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    ax = axes[0]
    ax.plot([r["tokens"] for r in train], [r["loss"] for r in train], label="train", lw=1)
    if evals:
        ax.plot([r["tokens"] for r in evals], [r["val_loss"] for r in evals], "o-",
                label="validation")  # fmt: skip
    ax.set(xlabel="tokens", ylabel="loss (nats/token)", title="Loss")
    ax.grid(alpha=0.3)
    ax.legend()
    ax = axes[1]
    domains = sorted({d for r in evals for d in r["val_by_domain"]})
    for d in domains:
        pts = [(r["tokens"], r["val_by_domain"][d]) for r in evals if d in r["val_by_domain"]]
        ax.plot(*zip(*pts, strict=True), "o-", label=d)
    ax.set(xlabel="tokens", ylabel="validation loss", title="Validation loss by domain")
    ax.grid(alpha=0.3)
    if domains:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def expert_load(load: dict[int, list[float]], path: Path) -> None:
    """A heatmap of each MoE layer's share of routed copies per expert (an even spread is
    healthy, a bright column a hot expert, a dark one a dead expert)."""
    plt = pyplot()

    layers = sorted(load)
    grid = [load[layer] for layer in layers]
    num_experts = len(grid[0])
    fig, ax = plt.subplots(figsize=(max(5.0, 0.45 * num_experts + 2), 0.5 * len(layers) + 2))
    im = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0)
    ax.set_yticks(range(len(layers)), [f"layer {layer}" for layer in layers])
    ax.set_xticks(range(num_experts))
    ax.set_xlabel("expert")
    ax.set_title(f"Share of routed tokens per expert (uniform = {1 / num_experts:.3f})")
    if num_experts <= 16:
        for i, row in enumerate(grid):
            for j, v in enumerate(row):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7, color="w")
    fig.colorbar(im, ax=ax, fraction=0.03)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def validation_curves(results: dict[str, Any], path: Path) -> None:
    """Validation loss of several runs against tokens and against wall-clock seconds; each
    result holds total_params, active_params and a curve of {tokens, seconds, val_loss}."""
    plt = pyplot()

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, r in results.items():
        label = (
            f"{name} ({r['total_params'] / 1e6:.1f}M total, {r['active_params'] / 1e6:.1f}M active)"
        )
        xs = [p["tokens"] for p in r["curve"]]
        ts = [p["seconds"] for p in r["curve"]]
        ys = [p["val_loss"] for p in r["curve"]]
        axes[0].plot(xs, ys, "o-", label=label)
        axes[1].plot(ts, ys, "o-", label=label)
    axes[0].set(xlabel="training tokens", ylabel="validation loss", title="Loss vs tokens")
    axes[1].set(xlabel="training seconds", ylabel="validation loss", title="Loss vs wall-clock")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
