"""`moekit analyze`: how a model routes real text, as plots, analysis.json and report.html."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any

from moekit.cli.common import add_device_argument, doc
from moekit.cli.format import console, maybe, print_json, table

if TYPE_CHECKING:
    from moekit.analysis.result import Analysis


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "analyze",
        help="routing analysis: load, specialisation, top tokens, consistency, co-activation",
        description=doc("moekit.analysis.analyze", "analyze"),
    )
    p.add_argument("model_dir", help="model directory (config.json, weights, tokenizer)")
    p.add_argument("--out", required=True, help="folder for the plots, JSON and report.html")
    p.add_argument(
        "--data",
        default=None,
        help="text to analyse: .txt, folder, .jsonl or .parquet (default: the builtin corpus' "
        "validation split, labelled by domain)",
    )
    p.add_argument("--text-field", default="text", help="text field of .jsonl/.parquet rows")
    p.add_argument("--domain-field", default=None, help="domain field of .jsonl rows")
    p.add_argument("--max-tokens", type=int, default=32_768, help="tokens to run (32768)")
    p.add_argument("--batch-size", type=int, default=8, help="rows per forward pass (8)")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per row (256)")
    p.add_argument(
        "--capacity-factor",
        type=float,
        default=None,
        help="count copies this capacity factor would drop (default: the model's, else 1.25)",
    )
    p.add_argument(
        "--layer", type=int, default=None, help="MoE layer for top tokens (default: the middle)"
    )
    p.add_argument(
        "--paraphrases", default=None, help='.jsonl of {"a": ..., "b": ...} paraphrase pairs'
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the label shuffles")
    add_device_argument(p)
    p.add_argument("--quiet", action="store_true", help="no progress line on stderr")
    p.add_argument("--json", action="store_true", help="print analysis.json to stdout")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from moekit.analysis.analyze import analyze

    result = analyze(
        args.model_dir,
        args.out,
        data=args.data,
        text_field=args.text_field,
        domain_field=args.domain_field,
        max_tokens=args.max_tokens,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        capacity_factor=args.capacity_factor,
        layer=args.layer,
        paraphrases=args.paraphrases,
        seed=args.seed,
        device=args.device,
        progress=not args.quiet,
    )
    if args.json:
        print_json(result.to_dict(), indent=1)
    else:
        print_summary(result, Path(args.out))
    return 0


def print_summary(result: Analysis, out_dir: Path) -> None:
    """A short table per MoE layer: load, entropy, specialisation, consistency."""
    from rich import box

    from moekit.analysis.report import REPORT_HTML
    from moekit.analysis.result import ANALYSIS_JSON

    load, spec = result.load.layers, result.specialisation
    cons = result.consistency.groups["builtin"].layers
    columns = ["layer", "imbalance", "dead", "entropy", "class NMI", "domain NMI",
               "paraphrase", "unrelated"]  # fmt: skip
    t = table(
        f"moekit analyze: {result.data.tokens:,} tokens",
        columns,
        right=set(columns[1:]),
        box=box.SIMPLE_HEAD,
        padding=(0, 1, 0, 0),
        pad_edge=False,
    )
    for i, v in load.items():
        t.add_row(
            str(i),
            f"{v.imbalance:.2f}",
            str(len(v.dead)),
            f"{v.entropy_normalized:.2f}",
            f"{spec.by_class.layers[i].nmi:.3f}",
            f"{spec.by_domain.layers[i].nmi:.3f}",
            f"{cons[i].paraphrase_weighted:.3f}",
            maybe(cons[i].unrelated_weighted),
        )
    out = console()
    out.print(t)
    for i, v in load.items():
        if v.groups is not None:  # hierarchical routing: the load per expert group
            dead = ", ".join(map(str, v.groups.dead)) or "none"
            out.print(
                f"layer {i} groups: copies {v.groups.copies_per_group}, imbalance "
                f"{v.groups.imbalance:.2f}, dead {dead}"
            )
    out.print(
        f"[dim]entropy: mean router entropy / ln(E). NMI: I(E;C)/H(C); chance (shuffled labels, "
        f"mean + 2 std) reaches {spec.by_class.chance:.4f} (class), {spec.by_domain.chance:.4f} "
        "(domain). "
        "paraphrase, unrelated: weighted Jaccard of the experts two prompts use.[/dim]"
    )
    out.print(f"  {out_dir / REPORT_HTML}  [dim]the report[/dim]")
    out.print(f"  {out_dir / ANALYSIS_JSON}  [dim]every number[/dim]")
