"""`moekit evidence`: the field's core MoE claims reproduced at a small scale, one report."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from moekit.cli.common import doc
from moekit.cli.format import console, print_json


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "evidence",
        help="reproduce the core MoE claims at demo scale and write one report",
        description=doc("moekit.bench.evidence", "run_evidence"),
    )
    p.add_argument("--budget", choices=("small", "full"), default="small",
                   help="small: a 2-layer model, under 20 minutes on 2 cores; full: the demo "
                   "model, 300 steps (about 80 minutes on 2 cores with --jobs 2)")  # fmt: skip
    p.add_argument("--out", required=True, help="folder for the runs and the report")
    p.add_argument("--only", default=None,
                   help="comma-separated comparisons to run (default: all)")  # fmt: skip
    p.add_argument("--seeds", default=None, help="seeds, e.g. 0,1,2 (default: 0,1)")
    p.add_argument("--steps", type=int, default=None, help="training steps per run")
    p.add_argument("--jobs", type=int, default=1,
                   help="runs trained at once, each in its own process with an equal share "
                   "of the threads (default 1; on a 2-core CPU, 2 finishes sooner)")  # fmt: skip
    p.add_argument("--json", action="store_true", help="print evidence.json")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import dataclasses

    from moekit.bench.evidence import budget, run_evidence
    from moekit.bench.evidence_report import write_report

    b = budget(args.budget)
    if args.seeds is not None:
        try:
            b = dataclasses.replace(b, seeds=tuple(int(s) for s in args.seeds.split(",")))
        except ValueError:
            raise ValueError(f"--seeds {args.seeds!r}: give whole numbers such as 0,1") from None
    if args.steps is not None:
        if args.steps < 2:
            raise ValueError(f"--steps {args.steps} is invalid: must be at least 2")
        every = max(1, args.steps // 3)
        warmup = min(b.train["warmup_steps"], every)
        train = {**b.train, "max_steps": args.steps, "eval_every": every, "warmup_steps": warmup}
        b = dataclasses.replace(b, train=train)
    only = tuple(x.strip() for x in args.only.split(",") if x.strip()) if args.only else None
    say = (lambda line: None) if args.json else (lambda line: console().print(f"[dim]{line}[/dim]"))
    evidence = run_evidence(b, args.out, only=only, say=say, jobs=args.jobs)
    paths = write_report(evidence, args.out)
    if args.json:
        print_json(evidence.to_dict())
        return 0
    out = console()
    for v in evidence.verdicts:
        out.print(f"{v.title}: {v.variant} {v.variant_loss:.4f} vs {v.baseline} "
                  f"{v.baseline_loss:.4f} ({v.difference:+.4f}); {v.reading}")  # fmt: skip
    for path in paths:
        out.print(f"  {Path(path)}")
    return 0
