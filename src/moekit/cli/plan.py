"""`moekit plan`: memory per device and bytes sent per step for every data-parallel x
expert-parallel split of N devices, from a config alone."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from moekit.cli.common import doc
from moekit.cli.format import console, print_json, table

if TYPE_CHECKING:
    from moekit.parallel.plan import ParallelPlan


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "plan",
        help="memory per device and all-to-all traffic of each DP x EP split of N devices",
        description=doc("moekit.parallel.plan", "plan_parallel"),
    )
    p.add_argument(
        "target", metavar="CONFIG", help="a preset name, a model directory or a config JSON file"
    )
    p.add_argument("--gpus", type=int, required=True, metavar="N", help="the number of devices")
    p.add_argument(
        "--gpu-memory",
        default="80GiB",
        metavar="SIZE",
        help="memory of one device (e.g. 80GiB, 141GB; default 80GiB)",
    )
    p.add_argument(
        "--tokens-per-step",
        type=int,
        metavar="T",
        help="tokens one device processes per forward and backward pass (default: one sequence)",
    )
    p.add_argument(
        "--seq-len",
        type=int,
        metavar="S",
        help="tokens of one sequence (default: the model's max_seq_len, at most 4096)",
    )
    p.add_argument("--ep", type=int, help="estimate this expert-parallel size only")
    p.add_argument(
        "--sharding",
        choices=("fsdp", "ddp"),
        default="fsdp",
        help="fsdp: parameters, gradients and optimizer state sharded (FSDP2, the default); "
        "ddp: replicated over the data-parallel group",
    )
    p.add_argument(
        "--activation-checkpointing",
        action="store_true",
        help="recompute each block in the backward pass: keep only its input",
    )
    p.add_argument(
        "--param-dtype",
        choices=("bf16", "fp32"),
        default="bf16",
        help="parameters (and activations) in this dtype (default bf16)",
    )
    p.add_argument("--grad-dtype", choices=("bf16", "fp32"), default="bf16", help="default bf16")
    p.add_argument(
        "--no-master-weights",
        dest="master_weights",
        action="store_false",
        help="with bf16 parameters: no fp32 master copy in the optimizer",
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from moekit.info import resolve_config
    from moekit.parallel.plan import plan_parallel

    plan = plan_parallel(
        resolve_config(args.target),
        gpus=args.gpus,
        gpu_memory=args.gpu_memory,
        tokens_per_step=args.tokens_per_step,
        seq_len=args.seq_len,
        param_dtype=args.param_dtype,
        grad_dtype=args.grad_dtype,
        master_weights=args.master_weights,
        sharding=args.sharding,
        activation_checkpointing=args.activation_checkpointing,
        ep=args.ep,
    )
    if args.json:
        print_json({"name": args.target, **plan.to_dict()})
    else:
        print_plan(args.target, plan)
    return 0


def print_plan(name: str, plan: ParallelPlan) -> None:
    optimizer = "AdamW: fp32 moments" + (" and fp32 master weights" if plan.master_weights else "")
    settings = (
        f"{plan.sharding}; {plan.tokens_per_step:,} tokens per device per step; parameters "
        f"{plan.param_dtype}, gradients {plan.grad_dtype}; {optimizer}; activation "
        f"checkpointing {'on' if plan.activation_checkpointing else 'off'}"
    )
    # One unit per kind of column, the largest that keeps the biggest figure above 1.
    mem_unit, mem_scale = _unit(max(s.total for s in plan.splits), BINARY)
    net_unit, net_scale = _unit(max(s.comm_bytes for s in plan.splits), DECIMAL)
    columns = ["DP", "EP", "experts", "weights", "grads", "optimizer", "activations", "total",
               "fits", "all-to-all", "collectives"]  # fmt: skip
    t = table(
        f"{name} on {plan.gpus} devices of {plan.gpu_memory / 2**30:,.1f} GiB",
        columns,
        right=set(columns) - {"fits"},
        caption=f"memory per device in {mem_unit}; all-to-all and collectives: {net_unit} each "
        "device sends per step; experts: routed experts per MoE layer per device; "
        "* recommended",
    )
    for i, s in enumerate(plan.splits):
        memory = (s.weights, s.gradients, s.optimizer, s.activations, s.total)
        t.add_row(
            str(s.dp),
            str(s.ep),
            str(s.experts_per_device),
            *(f"{n / mem_scale:,.1f}" for n in memory),
            ("yes" if s.fits else "no") + (" *" if i == plan.recommended else ""),
            *(f"{n / net_scale:,.1f}" for n in (s.all_to_all_bytes, s.collective_bytes)),
            style="bold" if i == plan.recommended else None,
        )
    out = console(wide=True)
    out.print(settings)
    out.print(t)
    out.print(f"recommended: {plan.reason}")
    for note in plan.notes:
        out.print(f"note: {note}")
    out.print(f"These are {plan.assumptions}. What they assume: docs/scaling.md.")


BINARY = (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10))
DECIMAL = (("GB", 10**9), ("MB", 10**6), ("kB", 10**3))


def _unit(largest: int, units: tuple[tuple[str, int], ...]) -> tuple[str, int]:
    return next((u for u in units if largest >= u[1]), units[-1])
