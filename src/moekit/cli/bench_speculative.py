"""`moekit bench generate --speculative`: greedy decoding with and without speculation."""

from __future__ import annotations

import argparse

from moekit.cli.common import speculative_config
from moekit.cli.format import print_json


def run_generate_speculative(args: argparse.Namespace) -> int:
    """`bench generate --speculative`: both sides ours, in one run (moekit.bench.speculative)."""
    from moekit.bench.speculative import bench_speculative

    if args.max_memory is not None:
        raise ValueError("--speculative measures a fully loaded model: leave out --max-memory")
    if args.batch_size != 1:
        raise ValueError("--speculative decodes one prompt at a time: leave out --batch-size")
    r = bench_speculative(
        args.model_dir,
        config=speculative_config(args),
        preset=args.preset,
        prompt_tokens=args.prompt_tokens,
        new_tokens=args.new_tokens,
        repeats=args.repeats,
    )
    if args.json:
        print_json(r.to_dict())
        return 0
    draft = f" (draft model {r.draft})" if r.draft else ""
    print(
        f"greedy generation, {r.model}, {r.prompt_tokens} prompt tokens ({r.prompt}) + "
        f"{r.new_tokens} new, speculative {r.method}{draft}, {r.num_draft_tokens} drafts per step:"
    )
    print(f"  decode   plain       {r.plain_tokens_per_s:9,.1f} tok/s")
    print(
        f"  decode   speculative {r.speculative_tokens_per_s:9,.1f} tok/s   {r.speedup:.2f}x"
        f"   same tokens: {r.same_tokens}"
    )
    print(
        f"  drafts accepted {r.acceptance_rate:.0%}; {r.tokens_per_pass:.2f} tokens per forward "
        "pass of the model (plain decoding: 1)"
    )
    print(
        f"  one forward pass: {r.decode_pass_s * 1e3:.2f} ms for one token, "
        f"{r.verify_pass_s * 1e3:.2f} ms for {r.num_draft_tokens + 1} ({r.verify_cost:.2f}x); "
        f"tokens per pass over that: {r.tokens_per_pass / r.verify_cost:.2f}x"
    )
    if r.num_experts is not None:
        print(
            f"  distinct experts per MoE layer: {r.experts_single:.2f} for one token, "
            f"{r.experts_verify:.2f} per verify pass of {r.num_draft_tokens + 1} tokens "
            f"(of {r.num_experts})"
        )
    return 0
