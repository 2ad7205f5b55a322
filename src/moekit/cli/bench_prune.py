"""`moekit bench prune`: validation loss, decode speed and expert memory against the number of
experts kept, per pruning criterion, before and after a short heal (moekit.bench.prune)."""

from __future__ import annotations

import argparse
from typing import Any

from moekit.cli.common import doc
from moekit.cli.format import console, nbytes, print_json, table


def add_prune_bench(benches: Any) -> None:
    p = benches.add_parser(
        "prune",
        help="loss, speed and memory against the experts kept, per pruning criterion",
        description=doc("moekit.bench.prune", "bench_prune"),
    )
    p.add_argument("model_dir")
    p.add_argument("--out", required=True, help="folder for the pruned and healed models")
    p.add_argument("--keep", default="6,4,2", help="experts to keep per layer, e.g. 6,4,2")
    p.add_argument("--criteria", default="reap,frequency", help="reap, frequency or both")
    p.add_argument("--calibration-tokens", type=int, default=16_384)
    p.add_argument("--val-batches", type=int, default=8, help="batches of 8 validation rows")
    p.add_argument("--heal-steps", type=int, default=100, help="fine-tune steps (0: none)")
    p.add_argument("--heal-lr", type=float, default=5e-4)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(run=run_prune)


def run_prune(args: argparse.Namespace) -> int:
    from moekit.bench.prune import bench_prune

    try:
        keep = tuple(int(n) for n in args.keep.split(","))
    except ValueError:
        raise ValueError(f"--keep {args.keep!r}: give whole numbers such as 6,4,2") from None
    result = bench_prune(
        args.model_dir,
        args.out,
        keep=keep,
        criteria=tuple(c.strip() for c in args.criteria.split(",") if c.strip()),
        calibration_tokens=args.calibration_tokens,
        val_batches=args.val_batches,
        heal_steps=args.heal_steps,
        heal_lr=args.heal_lr,
        repeats=args.repeats,
        say=lambda line: None if args.json else console().print(f"[dim]{line}[/dim]"),
    )
    if args.json:
        print_json(result.to_dict())
        return 0
    full = next(r for r in result.rows if r.criterion == "none")
    t = table(
        f"experts kept: {result.model}",
        ["criterion", "experts", "val loss", "healed", "decode tok/s (batch 1)", "expert weights"],
        right={"experts", "val loss", "healed", "decode tok/s (batch 1)", "expert weights"},
        caption=f"{result.val_tokens:,} validation tokens; experts measured on "
        f"{result.calibration_tokens:,} training tokens; healed: {result.heal_steps} more steps "
        "(the unpruned model too)",
    )
    for r in result.rows:
        healed = "-" if r.healed_val_loss is None else f"{r.healed_val_loss:.4f}"
        speed = (
            f"{r.decode_tokens_per_s:.0f} ({r.decode_tokens_per_s / full.decode_tokens_per_s:.2f}x)"
        )
        t.add_row(
            r.criterion,
            str(r.experts),
            f"{r.val_loss:.4f}",
            healed,
            speed,
            nbytes(r.expert_bytes),
        )
    console(wide=True).print(t)
    return 0
