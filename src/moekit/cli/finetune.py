"""`moekit finetune`: LoRA, full or expert-specialised fine-tuning of a model directory."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from moekit.cli.common import doc, run_dir_hints, training_errors
from moekit.cli.format import print_json, print_run_summary


def add_parser(sub: Any) -> None:
    from moekit.finetune.config import METHODS

    p = sub.add_parser(
        "finetune",
        help="fine-tune a model directory on prompt/completion or chat examples",
        description=doc("moekit.finetune.config", "FinetuneConfig"),
    )
    # One positional list (the base directory is its item without "="): with a separate
    # optional BASE_DIR, `--resume --out D train.lr=1e-4` would take the override for it.
    p.add_argument(
        "positional",
        nargs="*",
        metavar="BASE_DIR [KEY=VALUE ...]",
        help="the model directory to start from (not with --resume), then dotted overrides, "
        "e.g. train.max_steps=500 finetune.lora.dropout=0.05",
    )
    p.add_argument("--data", help="a .jsonl file of examples")
    p.add_argument("--out", required=True, help="the fine-tuned model directory to write")
    p.add_argument(
        "--method",
        choices=list(METHODS),
        default="lora",
        help="lora: low-rank adapters only (default); full: every weight; esft: only the experts "
        "the data routes to most",
    )
    p.add_argument("--lora-rank", type=int, default=None, help="adapter rank (default 8)")
    p.add_argument(
        "--lora-alpha", type=float, default=None, help="update scale alpha / rank (default 16)"
    )
    p.add_argument(
        "--lora-targets",
        help="comma-separated weight-name patterns (default: attention, experts, shared "
        "experts and dense MLPs; add *.ffn.router to adapt routers)",
    )
    p.add_argument(
        "--esft-coverage",
        type=float,
        default=None,
        help="esft: per layer, train the fewest experts holding this share of the routing "
        "weight (default 0.5)",
    )
    p.add_argument("--config", help="a YAML/JSON file with train/finetune sections")
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.add_argument("--json", action="store_true", help="print the final figures as JSON")
    p.set_defaults(run=run)


def _overrides(args: argparse.Namespace) -> list[str]:
    """The dotted overrides, with the shorthand flags turned into theirs."""
    overrides = [a for a in args.positional if "=" in a]
    for flag, key in (
        (args.lora_rank, "finetune.lora.rank"),
        (args.lora_alpha, "finetune.lora.alpha"),
        (args.esft_coverage, "finetune.esft_coverage"),
    ):
        if flag is not None:
            overrides.append(f"{key}={flag}")
    if args.lora_targets:
        overrides.append(f"finetune.lora.targets={json.dumps(args.lora_targets.split(','))}")
    return overrides


def run(args: argparse.Namespace) -> int:
    from moekit.model_dir import FinetuneSummary
    from moekit.training.config import finetune_run_config, resume_run_config
    from moekit.training.trainer import train

    bases = [a for a in args.positional if "=" not in a]
    if len(bases) > 1:
        raise ValueError(f"expected one base model directory, got {bases}")
    if args.resume and (bases or args.data):
        raise ValueError(
            "--resume continues the run in --out with its own base model and data; "
            "do not pass BASE_DIR or --data"
        )
    if not args.resume and (not bases or not args.data):
        raise ValueError("a BASE_DIR and --data FILE.jsonl are required")
    hint = f"moekit finetune --out {args.out} --resume"
    with run_dir_hints(), training_errors("finetune", resume_hint=hint):
        if args.resume:
            cfg = resume_run_config(args.out, _overrides(args))
        else:
            cfg = finetune_run_config(
                bases[0], args.data, method=args.method, config_file=args.config,
                overrides=_overrides(args),
            )  # fmt: skip
        result = train(cfg, args.out, resume=args.resume, verbose=not args.quiet)
    summary = FinetuneSummary.load(args.out)
    assert summary is not None  # a fine-tuning run writes it before its first step
    figures: dict[str, Any] = {
        "run_dir": args.out,
        "method": summary.method,
        "steps": result.step,
        "val_loss": result.val_loss,
        "trainable_params": summary.trainable_params,
        "total_params": summary.total_params,
        "trainable_fraction": summary.trainable_fraction,
    }
    if summary.esft_experts is not None:
        figures["esft_experts"] = summary.esft_experts
    if args.json:
        print_json(figures)
        return 0
    print_run_summary(Path(args.out), result.step, result.tokens, result.seconds, result.val_loss)
    print(
        f"trained {summary.trainable_params:,} of {summary.total_params:,} parameters "
        f"({summary.trainable_fraction:.2%}) with {summary.method}"
    )
    return 0
