"""`moekit convert`: Hugging Face checkpoints to moekit model directories and back, and LoRA
adapters to PEFT's format."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from moekit.cli.common import doc
from moekit.cli.format import print_json


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "convert",
        help="convert Hugging Face checkpoints to moekit model directories and back",
        description=doc("moekit.interop.hf", "import_hf")
        + " "
        + doc("moekit.interop.hf", "export_hf"),
    )
    p.add_argument("--from-hf", metavar="HF_DIR", help="import this Hugging Face checkpoint")
    p.add_argument("--to-hf", metavar="MODEL_DIR", help="export this moekit model directory")
    p.add_argument(
        "--to-peft",
        metavar="ADAPTER_DIR",
        help="write this LoRA adapter (or a LoRA fine-tuned model's adapter/) in PEFT's format, "
        "for the base model exported with --to-hf",
    )
    p.add_argument(
        "--arch",
        help="with --to-peft: the architecture the base was exported as (default: the one "
        "--to-hf picks)",
    )
    p.add_argument(
        "--base-hf",
        default="",
        help="with --to-peft: the exported base's path or hub name, recorded for PEFT",
    )
    p.add_argument("--out", required=True, help="the directory to write")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="convert the weights (default: keep them as stored)")  # fmt: skip
    p.add_argument("--quantize", type=int, choices=[8, 4], default=None,
                   help="with --from-hf: store the routed experts as int8 or int4")  # fmt: skip
    p.add_argument("--group-size", type=int, default=None,
                   help="with --quantize 4: input columns per scale (default 32)")  # fmt: skip
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if sum(map(bool, (args.from_hf, args.to_hf, args.to_peft))) != 1:
        raise ValueError(
            "give exactly one of --from-hf HF_DIR, --to-hf MODEL_DIR or --to-peft ADAPTER_DIR"
        )
    if args.to_peft:
        return _to_peft(args)
    from moekit.interop.checkpoint import HFCheckpoint
    from moekit.interop.hf import architecture_of, export_hf, import_hf
    from moekit.params import count_params

    figures: dict[str, Any]
    if args.from_hf:
        arch = architecture_of(HFCheckpoint(args.from_hf).config).name
        if args.group_size is not None and args.quantize != 4:
            raise ValueError("--group-size needs --quantize 4")
        imported = import_hf(
            args.from_hf,
            args.out,
            dtype=args.dtype,
            quantize=args.quantize,
            group_size=args.group_size,
        )
        pc = count_params(imported)
        figures = {"direction": "from-hf", "architecture": arch, "out": args.out,
                   "total_params": pc.total, "active_params": pc.active}  # fmt: skip
    else:
        if args.quantize is not None:
            raise ValueError("--quantize applies to --from-hf only (use moekit quantize)")
        from moekit.model_dir import ModelDir

        if (q := ModelDir(args.to_hf).config().quantization) is not None:
            print(
                f"{args.to_hf} is quantised ({q.bits} bits): exporting its weights dequantised "
                f"to {args.dtype or 'float32'} (the Hugging Face checkpoint holds no "
                "quantisation)",
                file=sys.stderr,
            )
        arch = export_hf(args.to_hf, args.out, dtype=args.dtype)
        figures = {"direction": "to-hf", "architecture": arch, "out": args.out}
    if args.json:
        print_json(figures)
    else:
        print(f"{'imported' if args.from_hf else 'exported as'} {arch}: {args.out}")
    return 0


def _to_peft(args: argparse.Namespace) -> int:
    from moekit.finetune.peft import export_peft

    done = export_peft(
        args.to_peft, args.out, architecture=args.arch, base_model_name_or_path=args.base_hf
    )
    figures = {
        "direction": "to-peft",
        "out": args.out,
        "target_modules": len(done.target_modules),
        "target_parameters": len(done.target_parameters),
    }
    if args.json:
        print_json(figures)
    else:
        print(
            f"wrote a PEFT LoRA adapter to {args.out}: {figures['target_modules']} modules, "
            f"{figures['target_parameters']} router or stacked-expert parameters"
        )
    return 0
