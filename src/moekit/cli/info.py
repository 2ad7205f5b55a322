"""`moekit info`: parameters, FLOPs and memory of presets and model directories."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING, Any

from moekit.cli.common import doc
from moekit.cli.format import console, flops, human, nbytes, print_json, table

if TYPE_CHECKING:
    from moekit.info import ModelInfo
    from moekit.params import ModelSummary


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "info",
        help="parameters, FLOPs and memory of a preset or model directory",
        description=doc("moekit.params", "summary"),
    )
    p.add_argument(
        "target", nargs="*", help="a preset name or a model directory; two or more: side by side"
    )
    p.add_argument("--list", action="store_true", help="list the presets")
    p.add_argument("--context", type=int, default=2048, help="context length for FLOPs")
    p.add_argument(
        "--speed",
        action="store_true",
        help="predict decode tokens/s at batch 1 from the bytes read per token and the memory "
        "bandwidth measured on this machine (takes a few seconds)",
    )
    p.add_argument(
        "--max-memory",
        metavar="SIZE",
        help="with --speed: the experts paged under this budget of weights (e.g. 6GiB); adds "
        "the budget's plan and the cache hit rate expected under uniform routing",
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from moekit.info import model_info, preset_infos, ratios

    if args.list:
        rows = preset_infos()
        if args.json:
            print_json([vars(r) for r in rows])
            return 0
        t = table("moekit presets", ["name", "total", "active", "description"],
                  right={"total", "active"})  # fmt: skip
        for r in rows:
            t.add_row(r.name, human(r.total_params), human(r.active_params), r.description)
        console().print(t)
        return 0
    if not args.target:
        raise ValueError("name a preset or a model directory, or pass --list")
    if args.speed:
        return run_speed(args)
    infos = [model_info(target, context=args.context) for target in args.target]
    if len(infos) > 1:
        if args.json:
            print_json({"models": [i.to_dict() for i in infos], "ratios": ratios(infos)})
        else:
            print_comparison(infos)
        return 0
    if args.json:
        print_json(infos[0].to_dict())
    else:
        print_info(infos[0])
    return 0


def print_comparison(infos: list[ModelInfo]) -> None:
    t = table(
        "moekit info: side by side",
        ["figure", *(i.name for i in infos)],
        right={i.name for i in infos},
        caption=f"(x): relative to {infos[0].name}",
    )
    first = infos[0].summary

    def row(label: str, get: Callable[[ModelSummary], float], fmt: Callable[[float], str]) -> None:
        base = get(first)

        def cell(s: ModelSummary) -> str:
            value = get(s)
            return fmt(value) + (f" ({value / base:.2f}x)" if base and value != base else "")

        t.add_row(label, *(cell(i.summary) for i in infos))

    summaries = [i.summary for i in infos]
    row("total parameters", lambda s: s.total_params, human)
    row("active parameters / token", lambda s: s.active_params, human)
    t.add_row("active fraction", *(f"{s.active_fraction:.1%}" for s in summaries))
    row(
        f"forward FLOPs / token (context {first.flops_context})", lambda s: s.flops_per_token, flops
    )
    t.add_row("layers (MoE)", *(f"{s.num_layers} ({s.moe_layers})" for s in summaries))
    t.add_row(
        "experts, top-k",
        *(f"{s.num_experts}, {s.top_k}" if s.num_experts else "dense" for s in summaries),
    )
    if any(s.routing for s in summaries):
        t.add_row("routing", *(s.routing or "-" for s in summaries))
    t.add_row("RoPE base, scaling", *(f"{i.rope_theta:g}, {i.rope}" for i in infos))
    if any(i.irope is not None for i in infos):
        t.add_row("NoPE layers, chunks", *(i.irope.describe() if i.irope else "-" for i in infos))
    for dtype in first.weight_memory_bytes:
        row(f"weights in {dtype}", partial(_memory, "weight_memory_bytes", dtype), nbytes)
    for dtype in first.kv_cache_bytes_per_1k_tokens:
        kv = partial(_memory, "kv_cache_bytes_per_1k_tokens", dtype)
        row(f"KV cache / 1k tokens ({dtype})", kv, nbytes)
    if any(s.kv_latent_cache_bytes_per_1k_tokens for s in summaries):
        t.add_row(
            "latent KV cache / 1k tokens (bf16)",
            *(
                nbytes(s.kv_latent_cache_bytes_per_1k_tokens["bf16"])
                if s.kv_latent_cache_bytes_per_1k_tokens
                else "-"
                for s in summaries
            ),
        )
    console(wide=True).print(t)


def _memory(figure: str, dtype: str, s: ModelSummary) -> float:
    by_dtype: dict[str, int] = getattr(s, figure)
    return by_dtype[dtype]


def print_info(info: ModelInfo) -> None:
    s = info.summary
    t = table(info.name, ["figure", "value"], right={"value"}, show_header=False)
    t.add_row("total parameters", f"{human(s.total_params)} ({s.total_params:,})")
    t.add_row("active parameters / token", f"{human(s.active_params)} ({s.active_params:,})")
    t.add_row("active fraction", f"{s.active_fraction:.1%}")
    t.add_row(f"forward FLOPs / token (context {s.flops_context})", flops(s.flops_per_token))
    t.add_row("layers (MoE)", f"{s.num_layers} ({s.moe_layers})")
    if s.num_experts:
        t.add_row("experts, top-k", f"{s.num_experts}, {s.top_k}")
    if s.routing:
        t.add_row("routing", s.routing)
    t.add_row("RoPE base, scaling", f"{info.rope_theta:g}, {info.rope}")
    if info.irope is not None:
        t.add_row("NoPE layers, chunks", info.irope.describe())
    for dtype, n in s.weight_memory_bytes.items():
        t.add_row(f"weights in {dtype}", nbytes(n))
    for dtype, n in s.kv_cache_bytes_per_1k_tokens.items():
        t.add_row(f"KV cache / 1k tokens of context ({dtype})", nbytes(n))
    for dtype, n in (s.kv_latent_cache_bytes_per_1k_tokens or {}).items():
        t.add_row(f"latent KV cache / 1k tokens ({dtype})", nbytes(n))
    tuned = info.finetune
    if tuned:
        t.add_row("fine-tuned from", f"{tuned.base} ({tuned.method})")
        t.add_row(
            "trained parameters",
            f"{human(tuned.trainable_params)} of {human(tuned.total_params)} "
            f"({tuned.trainable_fraction:.2%})"
            + (" with the adapters (merged now)" if tuned.method == "lora" else ""),
        )
        for layer, experts in (tuned.esft_experts or {}).items():
            t.add_row(f"experts trained, layer {layer}", ", ".join(map(str, experts)))
    out = console()
    out.print(t)
    parts = table("parameters by part", ["part", "total", "active / token"],
                  right={"total", "active / token"})  # fmt: skip
    for part, total in s.total_params_by.items():
        if total:
            parts.add_row(part, human(total), human(s.active_params_by[part]))
    out.print(parts)
    if info.stored is not None:
        print_stored(info, out)


def run_speed(args: argparse.Namespace) -> int:
    from moekit.info import resolve_config, speed_info

    if len(args.target) != 1:
        raise ValueError("--speed takes one preset or model directory")
    target = args.target[0]
    plan = None
    if args.max_memory is not None:
        from moekit.files import parse_size
        from moekit.infer.offload import plan_budget
        from moekit.quant.build import meta_model  # counts quantised experts as stored

        budget = parse_size(args.max_memory)
        plan = plan_budget(meta_model(resolve_config(target)), budget)
    pred = speed_info(target, cache_slots=None if plan is None else plan.slots)
    if args.json:
        extra: dict[str, Any] = {}
        if plan is not None:
            extra["budget"] = {"max_memory": budget, **plan.to_dict()}
            extra["hit_rate_model"] = "uniform routing: slots / experts per layer"
        print_json({"name": target, **pred.to_dict(), **extra})
        return 0
    sb = pred.bytes
    caption = (
        f"weights as stored, KV cache of {sb.context} positions; small models are bound by "
        "per-call overhead and stay below this"
    )
    if plan is not None:
        caption += (
            "; hit rate: uniform routing (slots / experts), real routing usually hits more; "
            "misses read warm from the page cache"
        )
    t = table(
        f"{target}: decode speed bound, batch 1",
        ["figure", "value"],
        right={"value"},
        show_header=False,
        caption=caption,
    )
    for part, n in sb.by_part.items():
        if n:
            t.add_row(f"read per token: {part.replace('_', ' ')}", nbytes(n))
    t.add_row("read per token: total", nbytes(sb.total))
    t.add_row("memory bandwidth (measured now)", f"{pred.bandwidth / 1e9:.1f} GB/s")
    if plan is not None:
        t.add_row("budget", nbytes(budget))
        t.add_row("budget: weights always in memory", nbytes(plan.resident))
        t.add_row(
            "budget: expert cache",
            f"{nbytes(plan.cache)} ({plan.slots} of {plan.experts_per_layer} experts per layer)",
        )
        t.add_row("budget: minimum", nbytes(plan.minimum))
        t.add_row("expected expert hit rate", f"{pred.expert_hit_rate:.1%}")
        if pred.miss_bandwidth is not None:
            t.add_row("file read bandwidth (measured now)", f"{pred.miss_bandwidth / 1e9:.1f} GB/s")
    t.add_row("predicted decode tokens/s", f"{pred.tokens_per_s:,.0f}")
    console().print(t)
    return 0


def print_stored(info: ModelInfo, out: Any) -> None:
    stored = info.stored
    assert stored is not None
    q = stored.quantization
    title = "weights as stored"
    if q:
        group = f", groups of {q['group_size']}" if q.get("group_size") else ""
        title += f" (quantised: {q['bits']} bits{group}, {q['parts']})"
    t = table(title, ["", "bytes", "share"], right={"bytes", "share"})
    total = stored.total or 1
    for dtype, n in sorted(stored.by_dtype.items(), key=lambda kv: -kv[1]):
        t.add_row(f"dtype {dtype}", nbytes(n), f"{n / total:.1%}")
    for part, n in stored.by_part.items():
        if n:
            t.add_row(f"part {part}", nbytes(n), f"{n / total:.1%}")
    t.add_row("total", nbytes(stored.total), "100%")
    out.print(t)
