"""`moekit quantize`: a weight-only int8 or int4 copy of a model directory."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from moekit.cli.common import doc
from moekit.cli.format import nbytes, print_json


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "quantize",
        help="write an int8 or int4 (weight-only) copy of a model directory",
        description=doc("moekit.interop.quantize", "quantize"),
    )
    p.add_argument("model_dir", nargs="?", help="the float model directory to quantise")
    p.add_argument(
        "--preset",
        help="instead of a model directory: random weights for this preset, made one block at "
        "a time (for measuring speed and memory of models larger than memory in float32)",
    )
    p.add_argument("--seed", type=int, default=0, help="with --preset: the random seed")
    p.add_argument("--bits", type=int, required=True, help="8 (int8) or 4 (int4)")
    p.add_argument(
        "--group-size",
        type=int,
        default=None,
        help="with --bits 4: input columns per scale (32, 64, 128 or 256; default 32)",
    )
    p.add_argument(
        "--only",
        default="experts",
        help="experts (the routed experts, the default) or all (every linear layer but the "
        "routers)",
    )
    p.add_argument("--out", required=True, help="the directory to write (must hold no model)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from moekit.interop.quantize import quantize, quantize_random

    if (args.model_dir is None) == (args.preset is None):
        raise ValueError("name a model directory or --preset NAME (random weights), not both")

    def progress(done: int, total: int, name: str) -> None:
        print(f"\r[{done}/{total}] {name}\x1b[K", end="", file=sys.stderr, flush=True)

    settings = {"bits": args.bits, "group_size": args.group_size, "only": args.only}
    try:
        if args.preset is not None:
            result = quantize_random(
                args.preset, args.out, **settings, seed=args.seed, progress=progress
            )
        else:
            result = quantize(args.model_dir, args.out, **settings, progress=progress)
    except ValueError as e:
        raise ValueError(_flags(str(e))) from None
    finally:
        print(file=sys.stderr)
    if args.json:
        print_json(result.to_dict())
        return 0
    group = f", groups of {result.group_size}" if result.group_size else ""
    print(
        f"quantised {result.tensors_quantized} tensors ({result.parts}) to {result.bits} bits"
        f"{group} in {result.out}: weights {nbytes(result.bytes_before)} -> "
        f"{nbytes(result.bytes_after)} ({result.ratio:.0%})"
    )
    return 0


def _flags(message: str) -> str:
    """The library's parameter names as this command's flags."""
    for name, flag in (
        ("bits=", "--bits "),
        ("group_size=", "--group-size "),
        ("only=", "--only "),
    ):
        message = message.replace(name, flag)
    return message
