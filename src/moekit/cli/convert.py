"""`moekit convert`: Hugging Face checkpoints and GGUF files to moekit model directories and
back, and LoRA adapters to PEFT's format."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from moekit.cli.common import doc
from moekit.cli.format import print_json


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "convert",
        help="convert Hugging Face checkpoints and GGUF files to moekit model directories and back",
        description=doc("moekit.interop.hf", "import_hf")
        + " "
        + doc("moekit.interop.hf", "export_hf")
        + " "
        + doc("moekit.interop.gguf", "export_gguf"),
    )
    p.add_argument("--from-hf", metavar="HF_DIR", help="import this Hugging Face checkpoint")
    p.add_argument("--to-hf", metavar="MODEL_DIR", help="export this moekit model directory")
    p.add_argument(
        "--to-gguf", metavar="MODEL_DIR", help="write this moekit model directory as a GGUF file"
    )
    p.add_argument("--from-gguf", metavar="FILE", help="import this GGUF file")
    p.add_argument(
        "--type",
        choices=["f32", "f16", "q8_0", "q4_0"],
        default="f16",
        help="with --to-gguf: the tensor type (default f16; routers and norms stay float32)",
    )
    p.add_argument(
        "--list",
        action="store_true",
        help="list every supported architecture with what is and is not carried",
    )
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
    p.add_argument("--out", help="the directory (or, with --to-gguf, the file) to write")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="convert the weights (default: keep them as stored)")  # fmt: skip
    p.add_argument("--quantize", type=int, choices=[8, 4], default=None,
                   help="with --from-hf: store the routed experts as int8 or int4")  # fmt: skip
    p.add_argument("--group-size", type=int, default=None,
                   help="with --quantize 4: input columns per scale (default 32)")  # fmt: skip
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    modes = (args.from_hf, args.to_hf, args.to_peft, args.to_gguf, args.from_gguf, args.list)
    if sum(map(bool, modes)) != 1:
        raise ValueError(
            "give exactly one of --from-hf HF_DIR, --to-hf MODEL_DIR, --to-gguf MODEL_DIR, "
            "--from-gguf FILE, --to-peft ADAPTER_DIR or --list"
        )
    if args.list:
        return _list(args)
    if not args.out:
        raise ValueError("--out is required: the directory (or GGUF file) to write")
    if args.to_peft:
        return _to_peft(args)
    if args.to_gguf or args.from_gguf:
        return _gguf(args)
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


def _gguf(args: argparse.Namespace) -> int:
    from moekit.interop.gguf import export_gguf, import_gguf

    if args.quantize is not None:
        raise ValueError("--quantize applies to --from-hf only (GGUF files choose --type)")
    if args.to_gguf:
        done = export_gguf(args.to_gguf, args.out, type=args.type)
        verb = "wrote"
    else:
        done = import_gguf(args.from_gguf, args.out, dtype=args.dtype)
        verb = "imported"
    figures = {
        "direction": "to-gguf" if args.to_gguf else "from-gguf",
        "architecture": done.architecture,
        "out": str(done.path),
        "type": done.type,
        "tensors": done.tensors,
    }
    if args.json:
        print_json(figures)
    else:
        print(f"{verb} {done.architecture} ({done.type}, {done.tensors} tensors): {done.path}")
    return 0


def _list(args: argparse.Namespace) -> int:
    from moekit.interop.catalog import catalog

    entries = catalog()
    if args.json:
        print_json([e.to_dict() for e in entries])
        return 0
    for e in entries:
        gguf = f", GGUF as {e.gguf}" if e.gguf else ", no GGUF"
        print(f"{e.name} ({e.model_type}{gguf})")
        for line in e.carried:
            print(f"  carried: {line}")
        for line in e.limits:
            print(f"  limit:   {line}")
    return 0
