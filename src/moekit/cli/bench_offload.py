"""`moekit bench offload` and `moekit bench generate --max-memory`: generation with the
routed experts paged under a memory budget (moekit.bench.offload, moekit.bench.paged)."""

from __future__ import annotations

import argparse
from typing import Any

from moekit.cli.common import doc, offload_config
from moekit.cli.format import console, nbytes, print_json, table

# ---- offload ----------------------------------------------------------------------------------


def add_offload_bench(benches: Any) -> None:
    p = benches.add_parser(
        "offload",
        help="generation with experts paged under a memory budget, by cache size",
        description=doc("moekit.bench.offload", "bench_offload"),
    )
    p.add_argument("model_dir")
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument(
        "--fractions", default="1,0.5,0.25,0.125", help="cache sizes, as fractions of the experts"
    )
    p.add_argument("--expert-cache", choices=("lru", "lfu"), default="lru")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per row, the fastest kept")
    p.add_argument(
        "--cold",
        action="store_true",
        help="drop the weight files from the operating system's page cache before each timed "
        "run, so that misses read from the disk",
    )
    p.add_argument(
        "--plot", metavar="FILE", help="also draw tokens/s and hit rate by cache size (PNG)"
    )
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(run=run_offload)


def run_offload(args: argparse.Namespace) -> int:
    from moekit.bench.offload import bench_offload

    try:
        fractions = tuple(float(f) for f in args.fractions.split(","))
    except ValueError:
        raise ValueError(
            f"--fractions {args.fractions!r}: give numbers such as 1,0.5,0.25"
        ) from None
    r = bench_offload(
        args.model_dir,
        prompt_tokens=args.prompt_tokens,
        new_tokens=args.new_tokens,
        fractions=fractions,
        policy=args.expert_cache,
        cold=args.cold,
        repeats=args.repeats,
    )
    plot = None
    if args.plot:
        from moekit.bench.offload_plot import plot_offload

        plot = str(plot_offload(r, args.plot))
    if args.json:
        print_json({**r.to_dict(), "plot": plot})
        return 0
    print(
        f"{r.model}: {r.moe_layers} MoE layers x {r.experts_per_layer} experts, weights "
        f"{nbytes(r.weights_bytes)} ({nbytes(r.resident_bytes)} always in memory); fully "
        f"loaded: {r.loaded_tokens_per_s:,.1f} tok/s decode ({r.loaded_predicted_tokens_per_s:,.0f}"
        f" predicted); memory {r.bandwidth / 1e9:.1f} GB/s, warm file reads "
        f"{r.read_bandwidth / 1e9:.1f} GB/s"
    )
    cold = any(row.cold for row in r.rows)
    print(
        "page cache: weight files dropped before each timed run (first reads from the disk)"
        if cold
        else "page cache: weight files left cached (misses are copies from memory)"
    )
    cols = ["experts cached", "budget", "prefetch", "tok/s", "loaded tok/s", "vs loaded",
            "predicted", "calibrated", "hit rate", "expected", "stall s", "read",
            "guessed right", "page cache", "same tokens"]  # fmt: skip
    t = table(
        "experts paged under a budget (greedy decode)",
        cols,
        right=set(cols[1:]),
        caption="loaded: the fully loaded model timed in turn with the row; predicted: info "
        "--speed --max-memory (uniform routing, a bandwidth bound); calibrated: the loaded "
        "speed slowed by the predicted misses; page cache: share of the weight files cached "
        "when the last timed run began",
    )
    pct = lambda v: "-" if v is None else f"{v:.0%}"  # noqa: E731
    for row in r.rows:
        t.add_row(
            f"{row.slots}/{r.experts_per_layer}", nbytes(row.budget),
            "yes" if row.prefetch else "no", f"{row.tokens_per_s:,.1f}",
            f"{row.loaded_tokens_per_s:,.1f}", f"{row.vs_loaded:.2f}x",
            f"{row.predicted_tokens_per_s:,.0f}", f"{row.calibrated_tokens_per_s:,.1f}",
            pct(row.hit_rate), pct(row.expected_hit_rate),
            f"{row.stall_s:.2f}", nbytes(row.bytes_read), pct(row.prefetch_accuracy),
            pct(row.page_cache), str(row.same_tokens),
        )  # fmt: skip
    console(wide=True).print(t)
    if plot:
        print(f"plot: {plot}")
    return 0


# ---- generate --max-memory ---------------------------------------------------------------------


def run_generate_paged(args: argparse.Namespace) -> int:
    """`bench generate --max-memory`: our side only, paged (moekit.bench.paged)."""
    from moekit.bench.paged import bench_generate_paged

    if args.model_dir is None:
        raise ValueError("--max-memory pages a model directory's weight files: name one")
    r = bench_generate_paged(
        args.model_dir,
        offload_config(args),
        batch_size=args.batch_size,
        prompt_tokens=args.prompt_tokens,
        new_tokens=args.new_tokens,
        repeats=args.repeats,
        sample=args.sample,
    )
    if args.json:
        print_json(r.to_dict())
        return 0
    o, p = r.offload, r.prediction
    print(
        f"{'sampled' if r.sampled else 'greedy'} generation, {r.model}, batch "
        f"{r.batch_size}, {r.prompt_tokens} prompt + "
        f"{r.new_tokens} new tokens, experts paged under {nbytes(r.max_memory)}: "
        f"{nbytes(o['resident_bytes'])} always in memory, {o['slots_per_layer']} of "
        f"{o['experts_per_layer']} experts per layer cached ({o['policy']}, prefetch "
        f"{'on' if o['prefetch'] else 'off'})"
    )
    print(f"  prefill  ours {r.prefill_tokens_per_s:9,.1f} tok/s")
    print(
        f"  decode   ours {r.decode_tokens_per_s:9,.1f} tok/s   predicted "
        f"{p.tokens_per_s:9,.1f} tok/s   measured / predicted {r.measured_over_predicted:.2f}"
    )
    hit = "-" if r.decode_hit_rate is None else f"{r.decode_hit_rate:.1%}"
    print(
        f"  expert hit rate while decoding {hit}   expected {r.expected_hit_rate:.1%} "
        "(uniform routing)"
    )
    miss = "" if p.miss_bandwidth is None else f", misses at {p.miss_bandwidth / 1e9:.1f} GB/s"
    print(
        f"  prediction: {p.bytes.per_token / 2**20:.1f} MiB read per token at "
        f"{p.bandwidth / 1e9:.1f} GB/s{miss}"
    )
    print(f"  peak resident {nbytes(r.peak_rss)} (before loading {nbytes(r.baseline_rss)})")
    accuracy = o["prefetch_accuracy"]
    print(
        f"  one whole generation: hit rate {o['hit_rate']:.1%}, read {nbytes(o['bytes_read'])}, "
        f"stalled {o['stall_s']:.3f} s"
        + ("" if accuracy is None else f", prefetch guessed right {accuracy:.0%}")
    )
    return 0
