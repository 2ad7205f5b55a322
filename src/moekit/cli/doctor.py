"""`moekit doctor`: check a model directory and its run for the silent MoE failures."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from moekit.cli.common import add_device_argument, doc
from moekit.cli.format import console, print_json

if TYPE_CHECKING:
    from moekit.analysis.doctor import Diagnosis


def add_parser(sub: Any) -> None:
    from moekit.analysis.doctor import SAMPLE_TOKENS

    p = sub.add_parser(
        "doctor",
        help="check a model directory (and its training run) for silent MoE failures",
        description=doc("moekit.analysis.doctor.diagnosis", "diagnose"),
    )
    p.add_argument("model_dir", metavar="MODEL_DIR", help="the model directory to check")
    p.add_argument(
        "--run",
        dest="run_dir",
        metavar="RUN_DIR",
        default=None,
        help="a training run directory whose metrics.jsonl and train_state/ to check too "
        "(default: MODEL_DIR itself when it holds them)",
    )
    p.add_argument(
        "--tokens",
        type=int,
        default=SAMPLE_TOKENS,
        help=f"tokens of builtin-corpus text to route through the model (default {SAMPLE_TOKENS})",
    )
    add_device_argument(p)
    p.add_argument(
        "--strict", action="store_true", help="exit with 1 on warnings too, not only on problems"
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Exit status 0 when no check found a problem, 1 when one did (with --strict, a warning
    counts too); a directory that cannot be read at all is a usage error (2)."""
    from moekit.analysis.doctor import diagnose

    diagnosis = diagnose(
        args.model_dir, run_dir=args.run_dir, sample_tokens=args.tokens, device=args.device
    )
    if args.json:
        print_json(diagnosis.to_dict(strict=args.strict))
    else:
        print_checks(diagnosis, strict=args.strict)
    return diagnosis.exit_code(strict=args.strict)


STYLES = {"ok": "green", "warning": "yellow", "problem": "bold red"}


def print_checks(diagnosis: Diagnosis, *, strict: bool = False) -> None:
    """One row per check (status, name, evidence and, unless ok, what to do), then a count."""
    from rich.table import Table
    from rich.text import Text

    run = diagnosis.run_dir
    title = f"moekit doctor {diagnosis.model_dir}" + (f" (run: {run})" if run is not None else "")
    t = Table(title=title, show_header=False, box=None, padding=(0, 1), expand=False)
    t.add_column("status", no_wrap=True)
    t.add_column("check", no_wrap=True)
    t.add_column("evidence", overflow="fold")
    for c in diagnosis:
        body = Text(c.evidence)
        if c.advice and c.status != "ok":
            body.append("\nwhat to do: ", style="bold")
            body.append(c.advice)
        t.add_row(Text(c.status, style=STYLES[c.status]), c.name.replace("_", " "), body)
    out = console()
    out.print(t)
    counts = diagnosis.counts()
    out.print(
        f"{len(diagnosis)} checks: {counts['ok']} ok, {counts['warning']} warning(s), "
        f"{counts['problem']} problem(s); exit code {diagnosis.exit_code(strict=strict)}"
    )
