"""`moekit experts`: add, split, merge or prune the experts of a trained model."""

from __future__ import annotations

import argparse
from typing import Any

from moekit.cli.common import doc
from moekit.cli.format import print_json


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "experts",
        help="add, split, merge or prune the experts of a trained model (a new directory)",
        description=doc("moekit.analysis.expert_edits", "edit_experts"),
    )
    p.add_argument("model_dir", help="the model to edit (only read)")
    p.add_argument("--out", required=True, help="the new model directory")
    edit = p.add_mutually_exclusive_group(required=True)
    edit.add_argument("--add", type=int, metavar="N", help="copies of the N busiest experts")
    edit.add_argument("--split", metavar="E,F,...", help="a copy of each of these experts")
    edit.add_argument(
        "--merge",
        metavar="E,F,...",
        action="append",
        help="these experts merged into one (repeat for several merges at once)",
    )
    edit.add_argument("--prune", type=int, metavar="K", help="remove the K that matter least")
    edit.add_argument("--prune-to", type=int, metavar="N", help="keep the N that matter most")
    p.add_argument(
        "--criterion",
        choices=("reap", "frequency"),
        default="reap",
        help="what pruning ranks by: router-weighted output norm (reap) or copies routed",
    )
    p.add_argument(
        "--data",
        default=None,
        help="calibration text (.txt, folder, .jsonl, .parquet; default: the builtin corpus' "
        "validation split)",
    )
    p.add_argument("--calibration-tokens", type=int, default=16_384, help="tokens to measure on")
    p.add_argument("--noise", type=float, default=0.0, help="multiplicative noise on copies")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress line on stderr")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from moekit.analysis.expert_edits import ExpertEdit, edit_experts, parse_ids
    from moekit.analysis.routing import stderr_progress

    if args.add is not None:
        edit = ExpertEdit("add", count=args.add)
    elif args.split is not None:
        edit = ExpertEdit("split", ids=parse_ids(args.split))
    elif args.merge is not None:
        sets = [parse_ids(text) for text in args.merge]
        edit = ExpertEdit("merge", ids=sets[0], sets=sets)
    elif args.prune is not None:
        edit = ExpertEdit("prune", count=args.prune)
    else:
        edit = ExpertEdit("prune_to", count=args.prune_to)
    result = edit_experts(
        args.model_dir,
        args.out,
        edit,
        criterion=args.criterion,
        data=args.data,
        calibration_tokens=args.calibration_tokens,
        noise=args.noise,
        seed=args.seed,
        progress=None if args.quiet else stderr_progress("calibration"),
    )
    if args.json:
        print_json(result.to_dict())
        return 0
    by = f" by {result.criterion}" if result.criterion else ""
    print(
        f"{result.experts_before} -> {result.experts_after} experts per MoE layer{by}; "
        f"loss on {result.before.tokens:,} calibration tokens {result.before.loss:.4f} -> "
        f"{result.loss_after:.4f}"
    )
    print(f"  {result.out_dir}  the edited model (experts_edit.json: what was done)")
    return 0
