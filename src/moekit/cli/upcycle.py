"""`moekit upcycle`: a dense model directory into an MoE that computes the same function."""

from __future__ import annotations

import argparse
from typing import Any

from moekit.cli.common import doc
from moekit.cli.format import human, print_json


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "upcycle",
        help="turn a dense model directory into an MoE (sparse upcycling)",
        description=doc("moekit.finetune.upcycle", "upcycle"),
    )
    p.add_argument("dense_dir")
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--granularity", type=int, default=1, help="fine-grained slices per copy")
    p.add_argument("--noise", type=float, default=0.0, help="multiplicative noise on copies")
    p.add_argument(
        "--first-dense-layers", type=int, default=0, help="layers that stay dense at the start"
    )
    p.add_argument("--layer-step", type=int, default=1, help="every k-th layer after is MoE")
    p.add_argument(
        "--dense-layers",
        type=_layer_list,
        default=None,
        metavar="I,J,...",
        help="the layers that stay dense, any set (instead of the two options above)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    p.add_argument("--json", action="store_true")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from moekit.finetune.upcycle import upcycle
    from moekit.params import count_params

    cfg = upcycle(
        args.dense_dir,
        args.out,
        num_experts=args.experts,
        top_k=args.top_k,
        granularity=args.granularity,
        noise=args.noise,
        seed=args.seed,
        first_dense_layers=args.first_dense_layers,
        layer_step=args.layer_step,
        dense_layers=args.dense_layers,
    )
    pc = count_params(cfg)
    if args.json:
        print_json({"out": args.out, "total_params": pc.total, "active_params": pc.active})
        return 0
    moe = cfg.moe
    assert moe is not None  # upcycle makes an MoE
    print(
        f"upcycled into {args.out}: {moe.num_experts} experts, top-{moe.top_k}; "
        f"{human(pc.total)} parameters, {human(pc.active)} active"
    )
    return 0


def _layer_list(text: str) -> list[int]:
    """ "1,3" -> [1, 3] (argparse reports the ValueError as an invalid value)."""
    return [int(part) for part in text.split(",") if part.strip()]
