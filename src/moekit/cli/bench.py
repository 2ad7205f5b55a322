"""`moekit bench`: benchmarks that print ratios measured in one run."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any

from moekit.cli.bench_offload import add_offload_bench, run_generate_paged
from moekit.cli.bench_prune import add_prune_bench
from moekit.cli.bench_topk import add_topk_bench
from moekit.cli.common import (
    add_offload_arguments,
    add_run_arguments,
    add_speculative_arguments,
    doc,
    run_config,
    training_errors,
)
from moekit.cli.format import console, human, nbytes, print_json, table

if TYPE_CHECKING:
    from moekit.bench.generate import GenerateBench

# A share of CPU time stolen by the hypervisor above which `bench generate` says its timings
# are disturbed.
STOLEN_WARN = 0.03


def add_parser(sub: Any) -> None:
    bench = sub.add_parser("bench", help="benchmarks that print ratios measured in one run")
    benches = bench.add_subparsers(dest="bench_command", metavar="BENCH", required=True)
    _add_layer(benches)
    _add_generate(benches)
    _add_serve(benches)
    _add_upcycle(benches)
    _add_train(benches)
    _add_quant(benches)
    add_offload_bench(benches)
    add_topk_bench(benches)
    add_prune_bench(benches)


# ---- layer ------------------------------------------------------------------------------------


def _add_layer(benches: Any) -> None:
    p = benches.add_parser(
        "layer",
        help="MoE layer vs dense-equivalent MLP vs transformers",
        description=(
            "Time the MoE layer, a dense SwiGLU MLP with the same active FLOPs, and "
            "transformers' Mixtral MoE block with the same weights (each of its experts "
            "implementations), for a coarse (8 experts, top-2, hidden 4x dim) and a "
            "fine-grained (64 experts, top-8, hidden dim/4) shape, at prefill and decode, "
            "forward and forward+backward. Prints ratios measured in this one run."
        ),
    )
    p.add_argument("--dim", type=int, default=512, help="model dimension (default 512)")
    p.add_argument("--repeats", type=int, default=5, help="timed samples per figure")
    p.add_argument("--shapes", default="coarse,fine", help="comma list of coarse,fine")
    p.add_argument("--phases", default="prefill,decode", help="comma list of prefill,decode")
    p.add_argument("--prefill-tokens", type=int, default=4096, help="tokens in the prefill phase")
    p.add_argument("--backend", default="auto", help="expert backend for ours")
    p.add_argument("--json", action="store_true", help="print JSON rows instead of a table")
    p.set_defaults(run=run_layer)


def run_layer(args: argparse.Namespace) -> int:
    from moekit.bench.layer import bench_layer

    result = bench_layer(
        prefill_tokens=args.prefill_tokens,
        dim=args.dim,
        repeats=args.repeats,
        shapes=tuple(args.shapes.split(",")),
        phases=tuple(args.phases.split(",")),
        backend=args.backend,
    )
    if args.json:
        print_json(result.to_rows())
        return 0
    shapes = sorted({(r.shape, r.num_experts, r.top_k, r.expert_hidden) for r in result.rows})
    caption = "; ".join(f"{n}: E={e}, K={k}, F={f}" for n, e, k, f in shapes)
    impls = result.hf_impls
    cols = ["shape", "phase", "pass", "ours", "dense", "dense/ours", "hf/ours"]
    cols += [f"hf {impl}" for impl in impls]
    t = table(
        f"MoE layer, dim {result.dim}, float32, medians of {result.repeats} (ms)",
        cols,
        right=set(cols[3:]),
        caption=f"{caption}; prefill {result.prefill_tokens} tokens, decode 1",
    )
    for r in result.rows:
        t.add_row(
            r.shape,
            r.phase,
            r.pass_,
            f"{r.ours_s * 1e3:.2f}",
            f"{r.dense_s * 1e3:.2f}",
            f"{r.dense_over_ours:.2f}x",
            f"{r.hf_over_ours:.2f}x" if r.hf_over_ours is not None else "n/a",
            *(_ms_or_skip(r.hf_s.get(impl), impl == r.hf_impl) for impl in impls),
        )
    console(wide=True).print(t)
    print(
        "dense/ours: our throughput relative to a dense SwiGLU MLP with the same active FLOPs "
        "(>1 is faster); hf/ours: our speed-up over transformers' fastest experts implementation "
        "(marked *); 'skip': that implementation would need over 2 GiB for its weight gather."
    )
    return 0


def _ms_or_skip(seconds: float | None, best: bool) -> str:
    if seconds is None:
        return "skip"
    return f"{seconds * 1e3:.2f}{'*' if best else ''}"


# ---- generate ---------------------------------------------------------------------------------


def _add_generate(benches: Any) -> None:
    p = benches.add_parser(
        "generate",
        help="generation speed: ours vs transformers' generate on the same weights",
        description=doc("moekit.bench.generate", "bench_generate"),
    )
    p.add_argument("model_dir", nargs="?", help="a model directory (default: a random preset)")
    p.add_argument("--preset", default="demo", help="used without a model directory")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    add_offload_arguments(p)  # with --max-memory: run_generate_paged
    add_speculative_arguments(p)  # with --speculative: run_generate_speculative
    p.add_argument(
        "--sample",
        action="store_true",
        help="with --max-memory: sample the new tokens (temperature 1) instead of greedy "
        "decoding, which on random weights repeats a token and its experts",
    )
    p.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="our decode steps through torch.compile (compiled in an untimed first run)",
    )
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(run=run_generate)


def run_generate(args: argparse.Namespace) -> int:
    from moekit.bench.generate import bench_generate

    if args.speculative is not None or args.draft is not None:
        from moekit.cli.bench_speculative import run_generate_speculative

        return run_generate_speculative(args)
    if args.max_memory is not None:
        return run_generate_paged(args)
    result = bench_generate(
        args.model_dir,
        preset=args.preset,
        batch_size=args.batch_size,
        prompt_tokens=args.prompt_tokens,
        new_tokens=args.new_tokens,
        repeats=args.repeats,
        compile=args.compile,
    )
    if args.json:
        print_json(result.to_dict())
    else:
        print_generate(result)
    return 0


def print_generate(result: GenerateBench) -> None:
    """`bench generate`'s report, as text."""
    weights = "float32" if result.quantization is None else result.quantization
    print(
        f"greedy generation, {result.model}, batch {result.batch_size}, "
        f"{result.prompt_tokens} prompt + {result.new_tokens} new tokens, {weights}:"
    )
    for phase, speed in (("prefill", result.prefill), ("decode", result.decode)):
        ours, hf, ratio = speed.ours_tokens_per_s, speed.hf_tokens_per_s, speed.ours_over_hf
        theirs = (
            f"   transformers {hf:9,.1f} tok/s   {ratio:.2f}x"
            if hf is not None and ratio is not None
            else ""
        )
        print(f"  {phase:8s} ours {ours:9,.1f} tok/s{theirs}")
    if result.hf_calls_per_step is not None:
        print(f"  same tokens as transformers: {result.same_tokens}")
    else:
        print(f"  transformers: not run ({result.no_reference})")
        if result.same_tokens is not None:
            print(f"  same tokens as our eager steps: {result.same_tokens}")
    how = "compiled" if result.compiled else "eager"
    print(f"  our decode steps: {how} (first generation, untimed: {result.ours_warmup_s:.1f} s)")
    if result.eager_decode_tokens_per_s is not None:
        gain = result.decode.ours_tokens_per_s / result.eager_decode_tokens_per_s
        print(
            f"  decode, our eager steps in the same run: {result.eager_decode_tokens_per_s:,.1f} "
            f"tok/s ({result.eager_calls_per_step:,} calls per step); compiled {gain:.2f}x"
        )
    theirs = (
        f"   transformers {result.hf_calls_per_step:,}"
        if result.hf_calls_per_step is not None
        else ""
    )
    print(f"  PyTorch calls per decode step: ours {result.ours_calls_per_step:,}{theirs}")
    bound = result.bound
    print(
        f"  bandwidth bound: {bound.bytes.per_token / 2**20:.1f} MiB read per token at "
        f"{bound.bandwidth / 1e9:.1f} GB/s = {bound.tokens_per_s:,.0f} tok/s predicted; "
        f"ours decodes at {result.fraction_of_bound:.0%} of it"
    )
    if result.stolen_cpu is not None and result.stolen_cpu >= STOLEN_WARN:
        print(
            f"  note: the hypervisor gave {result.stolen_cpu:.0%} of this machine's CPU time "
            "to others during the timed runs; timings are disturbed, run again when it is quieter"
        )


# ---- serve ------------------------------------------------------------------------------------


def _add_serve(benches: Any) -> None:
    p = benches.add_parser(
        "serve",
        help="server throughput with 1 vs N concurrent clients (or, with --shared-prefix, "
        "time to first token with and without the prefix cache)",
        description=doc("moekit.bench.serve", "bench_serve"),
    )
    p.add_argument("model_dir")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--seconds", type=float, default=20.0, help="per measurement")
    p.add_argument("--new-tokens", type=int, default=32, help="tokens per request")
    p.add_argument(
        "--no-hostile",
        action="store_true",
        help="without the slowloris and oversized-request clients beside the many clients",
    )
    p.add_argument(
        "--compile",
        action="store_true",
        help="the server decodes through torch.compile (as `moekit serve --compile`; compiled "
        "before the clients start)",
    )
    p.add_argument(
        "--shared-prefix",
        type=int,
        default=None,
        metavar="N",
        help="instead: time to first token of prompts sharing their first N tokens, with and "
        "without the prefix cache (see moekit.bench.serve.bench_prefix)",
    )
    p.add_argument(
        "--requests", type=int, default=5, help="with --shared-prefix: requests of each kind"
    )
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(run=run_serve)


def run_prefix(args: argparse.Namespace) -> int:
    from moekit.bench.serve import bench_prefix

    if args.shared_prefix < 1 or args.requests < 1:
        raise ValueError("--shared-prefix and --requests must be >= 1")
    result = bench_prefix(args.model_dir, shared_prefix=args.shared_prefix, requests=args.requests)
    if args.json:
        print_json(result.to_dict())
        return 0
    print(
        f"time to first token, prompts of {result.shared_prefix} shared + "
        f"{result.suffix_tokens} own tokens, {len(result.ttft_on_s)} requests each (median):"
    )
    print(f"  without the prefix cache {result.off_s * 1000:9.1f} ms")
    print(
        f"  with it                  {result.on_s * 1000:9.1f} ms "
        f"({result.cached_tokens} prompt tokens reused)"
    )
    print(f"  speed-up                 {result.speedup:9.2f}x")
    size = nbytes(result.bytes_per_token * result.capacity_tokens)
    print(
        f"  cost: {nbytes(result.bytes_per_token)} per cached token; this run's cache of "
        f"{result.capacity_tokens} tokens: {size}"
    )
    return 0


def run_serve(args: argparse.Namespace) -> int:
    from moekit.bench.serve import bench_serve

    if args.shared_prefix is not None:
        return run_prefix(args)

    result = bench_serve(
        args.model_dir,
        clients=args.clients,
        seconds=args.seconds,
        new_tokens=args.new_tokens,
        hostile=not args.no_hostile,
        compile=args.compile,
    )
    if args.json:
        print_json(result.to_dict())
        return 0
    one, many = result.one_client, result.many_clients
    how = "compiled" if result.compiled_steps else "eager"
    print(f"server decode throughput, {result.new_tokens} tokens per request ({how} steps):")
    for label, load in (("1 client", one), (f"{many.clients} clients", many)):
        print(
            f"  {label:10s} {load.tokens_per_s:8,.1f} tokens/s, {load.requests} requests, "
            f"latency p50 {load.p50_latency_s:.2f} s p99 {load.p99_latency_s:.2f} s, "
            f"{load.errors} errors"
        )
    print(f"  speed-up   {result.speedup:.2f}x (mean decode batch {result.mean_decode_batch:.1f})")
    if result.slowloris is not None and result.oversized is not None:
        sl, big = result.slowloris, result.oversized
        print(
            f"  beside them: slowloris, {sl.cut_by_server} of {sl.connections} connections cut "
            f"by the server (longest open {sl.longest_open_s:.1f} s); oversized, "
            f"{big.refused} of {big.requests} requests refused ({_statuses(big.statuses)})"
        )
    if result.memory is not None:
        mem = result.memory
        print(
            f"  memory     {nbytes(mem.before_bytes)} before, {nbytes(mem.peak_bytes)} peak "
            f"(+{nbytes(mem.growth_bytes)})"
        )
    return 0


def _statuses(statuses: dict[str, int]) -> str:
    return ", ".join(f"{n} x {status}" for status, n in sorted(statuses.items())) or "none"


# ---- upcycle ----------------------------------------------------------------------------------


def _add_upcycle(benches: Any) -> None:
    p = benches.add_parser(
        "upcycle",
        help="upcycled dense model vs the same MoE from scratch, same steps",
        description=doc("moekit.bench.upcycle", "bench_upcycle"),
    )
    add_run_arguments(
        p,
        config_help="run config or recipe (default: demo, unless --preset is given)",
        out_help="directory for the runs and the figures",
        json_help="print JSON",
    )
    p.add_argument("--dense-steps", type=int, default=300, help="steps of the dense model")
    p.add_argument("--steps", type=int, default=300, help="MoE steps, upcycled and scratch")
    p.add_argument("--granularity", type=int, default=1, help="fine-grained slices per copy")
    p.add_argument("--noise", type=float, default=0.0, help="multiplicative noise on copies")
    p.add_argument(
        "--no-dense-continue",
        action="store_true",
        help="skip the dense model trained for the same extra steps",
    )
    p.set_defaults(run=run_upcycle)


def run_upcycle(args: argparse.Namespace) -> int:
    from moekit.bench.upcycle import bench_upcycle

    cfg = run_config(args, default_recipe="demo")
    with training_errors("bench upcycle", resume_hint="the same command (it continues each run)"):
        summary = bench_upcycle(
            cfg,
            args.out,
            dense_steps=args.dense_steps,
            steps=args.steps,
            granularity=args.granularity,
            noise=args.noise,
            dense_continue=not args.no_dense_continue,
            verbose=not args.quiet,
        )
    if args.json:
        print_json(summary.to_dict())
        return 0
    t = table(
        f"Sparse upcycling: {summary.dense_steps} dense steps, then {summary.steps} "
        f"MoE steps ({summary.num_experts} experts, top-{summary.top_k})",
        ["run", "total params", "active params", "steps", "val loss"],
        right={"total params", "active params", "steps", "val loss"},
    )
    for name, r in summary.runs.items():
        t.add_row(
            name,
            human(r.total_params),
            human(r.active_params),
            f"{r.steps:,}",
            f"{r.val_loss:.4f}",
        )
    out = console()
    out.print(t)
    out.print(
        f"upcycled - scratch: {summary.upcycled_minus_scratch:+.4f} validation loss "
        f"(negative: the upcycled model is ahead); plot: {Path(args.out) / 'upcycle.png'}"
    )
    return 0


# ---- train ------------------------------------------------------------------------------------


def _add_train(benches: Any) -> None:
    p = benches.add_parser(
        "train",
        help="training step throughput: ours vs transformers' Mixtral",
        description=doc("moekit.bench.train", "bench_train"),
    )
    p.add_argument("--preset", default="demo", help="a Mixtral-compatible preset")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--repeats", type=int, default=5, help="timed steps per candidate")
    p.add_argument(
        "--nproc",
        type=int,
        default=1,
        help="time the step on this many processes (data parallel, FSDP2) against one process "
        "(instead of against transformers)",
    )
    p.add_argument("--ep", type=int, default=1, help="with --nproc: expert-parallel size")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(run=run_train)


def _run_train_parallel(args: argparse.Namespace) -> int:
    from moekit.bench.train_parallel import bench_train_parallel

    r = bench_train_parallel(
        preset=args.preset, batch_size=args.batch_size, seq_len=args.seq_len,
        nproc=args.nproc, ep=args.ep, repeats=args.repeats,
    )  # fmt: skip
    if args.json:
        print_json(r.to_dict())
        return 0
    print(
        f"training step, preset {r.preset}, batch {r.batch_size} x {r.seq_len} tokens, float32, "
        f"{r.nproc} processes (expert parallel over {r.ep}, {r.threads_per_process} threads each):"
    )
    before, after = r.tokens_per_s_one
    print(f"  one process        {before:10,.0f} tokens/s (before)  {after:,.0f} (after)")
    print(f"  {r.nproc} processes        {r.tokens_per_s:10,.0f} tokens/s   {r.speedup:.2f}x one")
    if r.ep > 1:
        print(
            f"  all-to-all: {100 * r.all_to_all_share:.1f}% of the step "
            f"({r.all_to_all_calls_per_step:.0f} exchanges per step)"
        )
    print(f"  first-step loss: one {r.first_loss_one:.6f}, split {r.first_loss:.6f}")
    return 0


def run_train(args: argparse.Namespace) -> int:
    from moekit.bench.train import bench_train

    if args.nproc > 1:
        return _run_train_parallel(args)
    if args.ep != 1:
        raise ValueError("--ep splits the experts over processes: give --nproc too")
    result = bench_train(
        preset=args.preset, batch_size=args.batch_size, seq_len=args.seq_len, repeats=args.repeats
    )
    if args.json:
        print_json(result.to_dict())
        return 0
    print(
        f"training step, preset {result.preset}, batch {result.batch_size} x "
        f"{result.seq_len} tokens, float32:"
    )
    print(f"  ours                      {result.ours_tokens_per_s:10,.0f} tokens/s")
    for impl, tps in result.hf_tokens_per_s.items():
        print(f"  transformers ({impl:10s}) {tps:10,.0f} tokens/s")
    if result.ours_over_hf_best is not None:
        best, ratio = result.hf_best_impl, result.ours_over_hf_best
        print(f"  ours / transformers' best ({best}): {ratio:.2f}x")
    return 0


# ---- quant ------------------------------------------------------------------------------------


def _add_quant(benches: Any) -> None:
    p = benches.add_parser(
        "quant",
        help="int8 and int4 experts against float32: validation loss, agreement, decode speed",
        description=doc("moekit.bench.quant", "bench_quant"),
    )
    p.add_argument("model_dir", nargs="?", help="a float32 model directory (with a tokenizer)")
    p.add_argument("--group-size", type=int, default=32, help="int4 group size (default 32)")
    p.add_argument(
        "--kernels",
        action="store_true",
        help="instead: each kernel at the expert shapes of --presets (random weights, no model)",
    )
    p.add_argument("--presets", default="olmoe-1b-7b,qwen3-30b-a3b", help="with --kernels")
    p.add_argument("--rows", default="1,4,8", help="with --kernels: rows per expert")
    p.add_argument("--val-batches", type=int, default=8, help="validation batches of 8 rows")
    p.add_argument("--prompts", type=int, default=8, help="prompts for greedy agreement")
    p.add_argument("--new-tokens", type=int, default=32, help="greedy tokens per prompt")
    p.add_argument("--repeats", type=int, default=5, help="timed samples per figure")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(run=run_quant)


def run_quant(args: argparse.Namespace) -> int:
    from moekit.bench.quant import bench_quant

    if args.kernels:
        return _run_quant_kernels(args)
    if args.model_dir is None:
        raise ValueError("bench quant needs a model directory (or --kernels)")
    result = bench_quant(
        args.model_dir,
        group_size=args.group_size,
        val_batches=args.val_batches,
        prompts=args.prompts,
        new_tokens=args.new_tokens,
        repeats=args.repeats,
    )
    if args.json:
        print_json(result.to_dict())
        return 0
    t = table(
        f"quantised experts vs float32: {result.model}",
        ["setting", "expert bytes", "val loss", "top-1 agree", "greedy agree", "experts (1 token)",
         "decode tok/s (batch 1)"],
        right={"expert bytes", "val loss", "top-1 agree", "greedy agree"},
        caption=f"{result.val_tokens:,} validation tokens; greedy: {result.prompts} prompts x "
        f"{result.new_tokens} tokens",
    )  # fmt: skip
    base = result.rows[0]
    ref_us = base.experts_us.get("float", 0.0)
    ref_tps = base.decode_tokens_per_s.get("float", 0.0)
    for row in result.rows:
        experts = ", ".join(
            f"{k} {v:.0f} us ({ref_us / v:.2f}x)" for k, v in row.experts_us.items()
        )
        decode = ", ".join(
            f"{k} {v:.0f} ({v / ref_tps:.2f}x)" for k, v in row.decode_tokens_per_s.items()
        )
        figures = nbytes(row.expert_bytes), f"{row.val_loss:.4f}"
        agree = f"{row.top1_agreement:.1%}", f"{row.greedy_agreement:.1%}"
        t.add_row(row.name, *figures, *agree, experts, decode)
    console(wide=True).print(t)
    return 0


def _run_quant_kernels(args: argparse.Namespace) -> int:
    from moekit.bench.quant import bench_quant_kernels

    try:
        rows = tuple(int(r) for r in args.rows.split(","))
    except ValueError:
        raise ValueError(f"--rows {args.rows!r}: give row counts such as 1,4,8") from None
    r = bench_quant_kernels(
        tuple(args.presets.split(",")), rows=rows, group_size=args.group_size,
        repeats=args.repeats,
    )  # fmt: skip
    if args.json:
        print_json(r.to_dict())
        return 0
    t = table(
        "quantised kernels at expert shapes: gate, up and down of one expert",
        ["preset", "rows", "setting", "kernel", "us / expert", "weight bytes", "GB/s",
         "of bandwidth", "vs float32"],
        right={"rows", "us / expert", "weight bytes", "GB/s", "of bandwidth", "vs float32"},
        caption=f"memory bandwidth {r.bandwidth / 1e9:.1f} GB/s (measured in this run); "
        f"{r.threads} threads; {r.experts} experts cycled",
    )  # fmt: skip
    for k in r.rows:
        t.add_row(
            k.preset, str(k.rows), k.setting, k.kernel, f"{k.us:,.0f}", nbytes(k.weight_bytes),
            f"{k.gb_per_s:.2f}", f"{k.of_bandwidth:.0%}", f"{k.vs_float32:.2f}x",
        )  # fmt: skip
    console(wide=True).print(t)
    return 0
