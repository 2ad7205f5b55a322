"""`moekit compare`: an MoE against dense models on the same data and tokens."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from moekit.cli.common import add_run_arguments, doc, run_config, training_errors
from moekit.cli.format import console, human, print_json, table


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "compare",
        help="train an MoE and dense baselines on the same data and tokens",
        description=doc("moekit.training.compare", "compare"),
    )
    add_run_arguments(
        p,
        config_help="a YAML/JSON run config, or a recipe name (default: demo, unless --preset "
        "is given)",
        out_help="directory for the runs and the comparison",
        json_help="print the figures as JSON",
    )
    p.add_argument(
        "--dense-total", action="store_true", help="also train a dense model of equal total size"
    )
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from moekit.training.compare import COMPARE_JSON, COMPARE_PLOT, compare

    cfg = run_config(args, default_recipe="demo")
    again = "the same compare command (it continues each run)"
    with training_errors("compare", resume_hint=again):
        result = compare(cfg, args.out, dense_total=args.dense_total, verbose=not args.quiet)
    if args.json:
        print_json(result.to_dict())
        return 0
    t = table(
        f"MoE vs dense on the same data and tokens ({args.out})",
        ["run", "total params", "active params", "tokens", "train s", "val loss"],
        right={"total params", "active params", "tokens", "train s", "val loss"},
    )
    for name, r in result.runs.items():
        t.add_row(
            name,
            human(r.total_params),
            human(r.active_params),
            f"{r.tokens:,}",
            f"{r.train_seconds:.0f}",
            "n/a" if r.val_loss is None else f"{r.val_loss:.4f}",
        )
    out = console()
    out.print(t)
    out.print(f"plot: {Path(args.out) / COMPARE_PLOT}; figures: {Path(args.out) / COMPARE_JSON}")
    return 0
