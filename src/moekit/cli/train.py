"""`moekit train`: train a model from a run config and write a model directory."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from moekit.cli.common import (
    add_run_arguments,
    doc,
    run_dir_hints,
    training_errors,
)
from moekit.cli.format import print_json, print_run_summary


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "train",
        help="train a model and write a model directory",
        description=doc("moekit.training.trainer", "train"),
    )
    add_run_arguments(
        p,
        config_help="a YAML/JSON run config, or a built-in recipe name (demo)",
        out_help="the run / model directory to write",
        json_help="print the final figures as JSON",
    )
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    p.add_argument(
        "--nproc",
        type=int,
        default=1,
        help="train in this many processes on this machine (launched with torchrun; data "
        "parallel with FSDP2, and expert parallel with --ep)",
    )
    p.add_argument(
        "--ep",
        type=int,
        default=None,
        help="expert-parallel size: each MoE layer's experts split over this many processes "
        "(sets train.ep; it must divide --nproc and the number of experts)",
    )
    p.set_defaults(run=run)


def _relaunch_args(args: argparse.Namespace) -> list[str]:
    """This command's arguments again, for each of the processes torchrun starts."""
    out = ["train", *args.overrides, "--out", str(args.out)]  # --ep is in the overrides now
    for flag in ("config", "preset"):
        if getattr(args, flag) is not None:
            out += [f"--{flag}", str(getattr(args, flag))]
    out += [f"--{flag}" for flag in ("resume", "quiet", "json") if getattr(args, flag)]
    return out


def run(args: argparse.Namespace) -> int:
    import os

    from moekit.training.config import resolve_run_config, resume_run_config
    from moekit.training.distributed import check_split, launch, launched_world
    from moekit.training.trainer import train

    if args.nproc < 1:
        raise ValueError(f"--nproc must be at least 1, got {args.nproc}")
    if args.ep is not None:
        args.overrides = [*args.overrides, f"train.ep={args.ep}"]
    run_dir = Path(args.out)
    with run_dir_hints():
        if args.resume and not (args.config or args.preset):
            cfg = resume_run_config(run_dir, args.overrides)
        else:
            cfg = resolve_run_config(
                config_file=args.config,
                preset=args.preset,
                overrides=args.overrides,
            )
        if args.nproc > 1 and launched_world() == 1:
            check_split(cfg, args.nproc)  # before starting any process
            return launch(args.nproc, _relaunch_args(args))
        with training_errors("train", resume_hint=f"moekit train --out {run_dir} --resume"):
            result = train(cfg, run_dir, resume=args.resume, verbose=not args.quiet)
    if os.environ.get("RANK", "0") != "0":
        return 0  # the main process prints the result
    if args.json:
        print_json(
            {
                "run_dir": str(result.run_dir),
                "steps": result.step,
                "tokens": result.tokens,
                "seconds": result.seconds,
                "val_loss": result.val_loss,
                "val_by_domain": result.val_by_domain,
                "skipped_steps": result.skipped_steps,
            }
        )
        return 0
    print_run_summary(run_dir, result.step, result.tokens, result.seconds, result.val_loss)
    return 0
