"""The figure of `moekit bench offload`: decode tokens/s and the expert cache's hit rate against
the cache size, with and without prefetch, beside the fully loaded model's speed (timed in turn
with each size) and the hit rate uniform routing would give (PNG, matplotlib on its file-only
backend)."""

from __future__ import annotations

from pathlib import Path

from moekit.bench.offload import OffloadBench
from moekit.report.plots import pyplot


def plot_offload(result: OffloadBench, path: str | Path) -> Path:
    """Draw `result` into the PNG file `path` (its folder is created); returns the path."""
    plt = pyplot()
    fig, (speed, hits) = plt.subplots(1, 2, figsize=(10, 3.8))
    experts = result.experts_per_layer
    for prefetch, style in ((False, "o-"), (True, "s--")):
        rows = sorted((r for r in result.rows if r.prefetch == prefetch), key=lambda r: r.slots)
        x = [100 * r.slots / experts for r in rows]
        label = "prefetch" if prefetch else "no prefetch"
        speed.plot(x, [r.tokens_per_s for r in rows], style, label=label)
        hits.plot(x, [100 * (r.hit_rate or 0.0) for r in rows], style, label=label)
    rows = sorted({r.slots: r for r in result.rows}.values(), key=lambda r: r.slots)
    x = [100 * r.slots / experts for r in rows]
    hits.plot(x, [100 * r.expected_hit_rate for r in rows], ":", color="gray",
              label="expected (uniform routing)")  # fmt: skip
    loaded = [
        sum(r.loaded_tokens_per_s for r in result.rows if r.slots == row.slots)
        / sum(1 for r in result.rows if r.slots == row.slots)
        for row in rows
    ]
    speed.plot(x, loaded, ":", color="gray", label="fully loaded, timed in turn")
    cold = " (page cache dropped)" if any(r.cold for r in result.rows) else ""
    for ax in (speed, hits):
        ax.set_xscale("log", base=2)
        ax.set_xticks(x, [f"{v:.3g}%" for v in x])
        ax.minorticks_off()
        ax.set_xlabel("expert cache, % of each layer's experts")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    speed.set(ylabel="decode tokens/s", ylim=(0, None), title=f"Decode speed{cold}")
    hits.set(ylabel="hit rate (%)", ylim=(0, 105), title="Expert cache hit rate")
    name = Path(result.model).name or result.model
    fig.suptitle(f"{name}: {result.moe_layers} MoE layers x {experts} experts", fontsize=10)
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=80)
    plt.close(fig)
    return out
