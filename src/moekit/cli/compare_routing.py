"""`moekit compare-routing A B`: per MoE layer, how often two models pick the same experts."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from moekit.cli.common import add_device_argument, doc
from moekit.cli.format import console, maybe, print_json, table

if TYPE_CHECKING:
    from moekit.analysis.compare_routing import RoutingComparison


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "compare-routing",
        help="routing parity: how often two models pick the same top-k experts, per layer",
        description=doc("moekit.analysis.compare_routing", "compare_routing"),
    )
    for side in ("a", "b"):
        p.add_argument(
            side,
            metavar=side.upper(),
            help="moekit model directory, adapter directory, or Hugging Face checkpoint",
        )
    p.add_argument(
        "--text",
        default=None,
        metavar="FILE",
        help="text to run: .txt, folder, .jsonl or .parquet (default: the builtin corpus' "
        "validation split)",
    )
    p.add_argument("--tokens", type=int, default=4096, help="tokens to run (4096)")
    p.add_argument("--batch-size", type=int, default=8, help="rows per forward pass (8)")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per row (256)")
    p.add_argument(
        "--margin",
        type=float,
        default=1e-4,
        help="selection-score gap below which a token's choice is a near tie (1e-4; 0 counts "
        "every difference)",
    )
    p.add_argument(
        "--threshold",
        type=float,
        default=0.99,
        help="a layer diverges when its set agreement (near ties left out) is below this (0.99)",
    )
    add_device_argument(p)
    p.add_argument("--quiet", action="store_true", help="no progress line on stderr")
    p.add_argument("--json", action="store_true", help="print the comparison as JSON")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from moekit.analysis.compare_routing import compare_routing

    result = compare_routing(
        args.a,
        args.b,
        text=args.text,
        tokens=args.tokens,
        seq_len=args.seq_len,
        batch_size=args.batch_size,
        margin=args.margin,
        threshold=args.threshold,
        device=args.device,
        progress=not args.quiet,
    )
    if args.json:
        print_json(result.to_dict(), indent=1)
    else:
        print_summary(result)
    return 0


def print_summary(result: RoutingComparison) -> None:
    """One row per MoE layer, then the first divergent layer."""
    from rich import box

    ag = result.agreement
    columns = ["layer", "same set", "overlap", "top-1", "near ties", "same set (decisive)",
               "first diverging"]  # fmt: skip
    t = table(
        f"moekit compare-routing: {result.tokens:,} tokens, top-{ag.top_k} of "
        f"{result.num_experts} experts",
        columns,
        right=set(columns[1:]),
        box=box.SIMPLE_HEAD,
        padding=(0, 1, 0, 0),
        pad_edge=False,
    )
    for row in ag.layers:
        t.add_row(
            str(row.layer),
            f"{row.set_match:.4f}",
            f"{row.overlap:.4f}",
            f"{row.top1:.4f}",
            str(row.near_ties),
            maybe(row.set_match_decisive, 4),
            str(row.first_divergence),
        )
    out = console()
    out.print(f"A: {result.a.path} ({result.a.kind})\nB: {result.b.path} ({result.b.kind})")
    out.print(t)
    first = ag.first_divergent_layer
    verdict = (
        f"first divergent layer: {first} (same set below {ag.threshold} of decisive tokens)"
        if first is not None
        else f"no layer diverges: every layer agrees on at least {ag.threshold} of decisive tokens"
    )
    out.print(verdict)
    out.print(
        f"[dim]{ag.never_diverging:,} of {ag.tokens:,} tokens never diverge. near ties: "
        f"tokens chosen with a selection-score gap below {ag.margin:g} on either side. "
        f"text: {result.text}[/dim]"
    )
