"""The report of `moekit evidence`: evidence.json (every number), summary.md (one table and a
line per claim) and report.html (the table, each comparison's validation curves, the routing
imbalance of the balancing comparison, the top-k table), plots as PNG beside them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from moekit.bench.evidence import Evidence, Verdict
from moekit.files import atomic_write_text, write_json
from moekit.report import page

EVIDENCE_JSON = "evidence.json"
SUMMARY_MD = "summary.md"
REPORT_HTML = "report.html"


def write_report(evidence: Evidence, out_dir: str | Path) -> list[Path]:
    """Write the three files (and the plots) into `out_dir`; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / EVIDENCE_JSON, evidence.to_dict())
    atomic_write_text(out / SUMMARY_MD, summary(evidence))
    images = {v.key: _curves(v, out / f"{v.key}.png") for v in evidence.verdicts}
    balance = next((v for v in evidence.verdicts if v.key == "aux_free"), None)
    if balance is not None:
        images["aux_free_balance"] = _imbalance(balance, out / "aux_free_balance.png")
    html = page.render(
        "evidence.html.j2",
        evidence=evidence,
        images={k: page.png_data_uri(p) for k, p in images.items()},
    )
    atomic_write_text(out / REPORT_HTML, html)
    return [out / EVIDENCE_JSON, out / SUMMARY_MD, out / REPORT_HTML]


def summary(evidence: Evidence) -> str:
    """The markdown summary: a table of the comparisons and the top-k table."""
    lines = [
        f"# moekit evidence ({evidence.budget} budget)",
        "",
        f"Seeds {evidence.seeds}, {evidence.steps} steps per run; {evidence.seconds / 60:.1f} "
        "minutes in this invocation (runs found finished under runs/ are reused). Validation "
        "loss at the end of training, mean over the seeds; a difference counts when every seed "
        "shows it and it exceeds the seed-to-seed spread of the per-seed differences.",
        "",
        "| claim | variant | loss | baseline | loss | difference | seed spread | reading |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for v in evidence.verdicts:
        spread = "n/a" if v.spread is None else f"{v.spread:.4f}"
        lines.append(
            f"| {v.title} | {v.variant} | {v.variant_loss:.4f} | {v.baseline} | "
            f"{v.baseline_loss:.4f} | {v.difference:+.4f} | {spread} | {v.reading} |"
        )
    extra = _extras(evidence.verdicts)
    if extra:
        lines += ["", *extra]
    if evidence.topk:
        lines += ["", "Experts per token at inference (the base MoE, trained with its k):", "",
                  "| k | validation loss | decode tokens/s |", "|---|---|---|"]  # fmt: skip
        lines += [
            f"| {r['k']} | {r['val_loss']:.4f} | {r['decode_tokens_per_s']:.0f} |"
            for r in evidence.topk
        ]
    return "\n".join(lines) + "\n"


def _extras(verdicts: list[Verdict]) -> list[str]:
    """Balance and drops where the claim is about them."""
    out = []
    for v in verdicts:
        if v.key == "aux_free":
            mean = {name: _late_imbalance(v, name) for name in (v.variant, v.baseline)}
            out.append(
                f"- Balance (mean max/mean expert load over the last half of training): "
                f"{v.variant} {mean[v.variant]:.3f}, {v.baseline} {mean[v.baseline]:.3f}."
            )
        if v.key == "capacity":
            drops = [r.drop_rate for r in v.runs if r.variant == v.variant]
            out.append(
                f"- Copies dropped at capacity 1.0: {sum(drops) / len(drops):.1%} of those routed."
            )
    return out


def _late_imbalance(v: Verdict, variant: str) -> float:
    values = []
    for r in v.runs:
        if r.variant == variant and r.imbalance:
            late = r.imbalance[len(r.imbalance) // 2 :]
            values.append(sum(p["imbalance"] for p in late) / len(late))
    return sum(values) / len(values) if values else float("nan")


def _curves(v: Verdict, path: Path) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for name, style in ((v.variant, "o-"), (v.baseline, "s--")):
        for r in (r for r in v.runs if r.variant == name):
            ax.plot([p["step"] for p in r.curve], [p["val_loss"] for p in r.curve], style,
                    label=f"{name}, seed {r.seed}", alpha=0.8)  # fmt: skip
    ax.set(xlabel="step", ylabel="validation loss", title=v.title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _imbalance(v: Verdict, path: Path) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for r in v.runs:
        ax.plot([p["step"] for p in r.imbalance], [p["imbalance"] for p in r.imbalance],
                label=f"{r.variant}, seed {r.seed}", alpha=0.8)  # fmt: skip
    ax.set(xlabel="step", ylabel="max / mean expert load", title="Routing imbalance")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _pyplot() -> Any:
    from moekit.report.plots import pyplot

    return pyplot()
