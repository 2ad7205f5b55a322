"""`moekit bench topk`: quality and decode speed of routing to k experts per token, for each
k against the trained one (moekit.bench.topk)."""

from __future__ import annotations

import argparse
from typing import Any

from moekit.cli.common import doc
from moekit.cli.format import console, print_json, table


def add_topk_bench(benches: Any) -> None:
    p = benches.add_parser(
        "topk",
        help="quality and speed of routing each token to k experts, per k",
        description=doc("moekit.bench.topk", "bench_topk"),
    )
    p.add_argument("model_dir")
    p.add_argument(
        "--k", default=None, help="the k to measure, e.g. 1,2,4 (default: 1 to twice the trained k)"
    )
    p.add_argument("--val-batches", type=int, default=8, help="batches of 8 validation rows")
    p.add_argument("--prompts", type=int, default=8, help="prompts for greedy agreement")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(run=run_topk)


def run_topk(args: argparse.Namespace) -> int:
    from moekit.bench.topk import bench_topk

    ks = None
    if args.k is not None:
        try:
            ks = tuple(int(k) for k in args.k.split(","))
        except ValueError:
            raise ValueError(f"--k {args.k!r}: give whole numbers such as 1,2,4") from None
    result = bench_topk(
        args.model_dir,
        ks=ks,
        val_batches=args.val_batches,
        prompts=args.prompts,
        new_tokens=args.new_tokens,
        repeats=args.repeats,
    )
    if args.json:
        print_json(result.to_dict())
        return 0
    t = table(
        f"experts per token vs the trained {result.trained_k}: {result.model}",
        ["k", "val loss", "vs trained", "top-1 agree", "greedy agree", "decode tok/s (batch 1)"],
        right={"val loss", "vs trained", "top-1 agree", "greedy agree"},
        caption=f"{result.val_tokens:,} validation tokens; greedy: {result.prompts} prompts x "
        f"{result.new_tokens} tokens; the routers allow k up to {result.max_k}",
    )
    ref = (
        next(r for r in result.rows if r.k == result.trained_k)
        if any(r.k == result.trained_k for r in result.rows)
        else None
    )
    for row in result.rows:
        delta = f"{row.val_loss - ref.val_loss:+.4f}" if ref else "-"
        speed = f"{row.decode_tokens_per_s:.0f}"
        if ref:
            speed += f" ({row.decode_tokens_per_s / ref.decode_tokens_per_s:.2f}x)"
        t.add_row(
            str(row.k), f"{row.val_loss:.4f}", delta, f"{row.top1_agreement:.1%}",
            f"{row.greedy_agreement:.1%}", speed,
        )  # fmt: skip
    console(wide=True).print(t)
    return 0
