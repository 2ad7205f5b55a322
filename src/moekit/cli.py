"""The `moekit` command line. Each subcommand is a thin call into the library.

Every command that prints figures takes `--json` and then prints one JSON document instead of
tables.
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from moekit.params import count_params


def _doc(module: str, name: str) -> str:
    """The first paragraph of a library function's docstring, for `--help`.

    Read from the source without importing the module, so `moekit --help` and the light
    commands never pay for importing torch.
    """
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        return ""
    tree = ast.parse(Path(spec.origin).read_text())
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.ClassDef) and node.name == name:
            doc = ast.get_docstring(node) or ""
            return " ".join(doc.split("\n\n")[0].split())
    return ""


def _print_json(data: Any) -> None:
    print(json.dumps(data, indent=2))


def _human(n: float) -> str:
    """A parameter count the way model cards write it: 46.70B, 1.28B, 386.37K."""
    for threshold, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= threshold:
            return f"{n / threshold:.2f}{suffix}"
    return f"{n:.0f}"


def _flops(n: float) -> str:
    for threshold, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K")):
        if n >= threshold:
            return f"{n / threshold:.2f} {prefix}FLOP"
    return f"{n:.0f} FLOP"


def _bytes(n: float) -> str:
    for threshold, suffix in ((2**40, "TiB"), (2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
        if n >= threshold:
            return f"{n / threshold:.2f} {suffix}"
    return f"{n:.0f} B"


# ---- info ----------------------------------------------------------------------------------


def resolve_config(target: str) -> Any:
    """A preset name, a model directory, or a config.json path -> ModelConfig."""
    from moekit.config import ModelConfig
    from moekit.presets import PRESETS, get_preset

    path = Path(target)
    if path.is_file() or (path / "config.json").is_file():  # a model directory wins over a preset
        return ModelConfig.load(path)
    if target in PRESETS:
        return get_preset(target)
    if path.exists():
        return ModelConfig.load(path)
    raise ValueError(
        f"{target!r} is neither a preset nor an existing model directory or config file; "
        f"presets: {', '.join(PRESETS)}"
    )


def cmd_info(args: argparse.Namespace) -> int:
    from moekit.presets import PRESETS

    if args.list:
        rows: list[dict[str, Any]] = [
            {
                "name": p.name,
                "description": p.description,
                "total_params": count_params(p.build()).total,
                "active_params": count_params(p.build()).active,
            }
            for p in PRESETS.values()
        ]
        if args.json:
            _print_json(rows)
            return 0
        from rich.console import Console
        from rich.table import Table

        table = Table(title="moekit presets")
        for col in ("name", "total", "active", "description"):
            table.add_column(col, justify="right" if col in ("total", "active") else "left")
        for r in rows:
            table.add_row(
                r["name"], _human(r["total_params"]), _human(r["active_params"]), r["description"]
            )
        Console().print(table)
        return 0
    if not args.target:
        raise ValueError("name a preset or a model directory, or pass --list")
    infos = [_info(target, args.context) for target in args.target]
    if len(infos) > 1:
        comparison = {"models": infos, "ratios": _ratios(infos)}
        if args.json:
            _print_json(comparison)
        else:
            _print_info_comparison(comparison)
        return 0
    if args.json:
        _print_json(infos[0])
        return 0
    _print_info_table(infos[0])
    return 0


def _info(target: str, context: int) -> dict[str, Any]:
    """`moekit info`'s figures for one preset or model directory."""
    from moekit.params import summary

    info = {"name": target, **summary(resolve_config(target), context=context)}
    tuned = Path(target) / "finetune.json"
    if tuned.is_file():
        t = json.loads(tuned.read_text())
        info["finetune"] = {
            k: t[k]
            for k in ("method", "base", "trainable_params", "total_params", "trainable_fraction")
            if k in t
        }
        if "esft_experts" in t:
            info["finetune"]["esft_experts"] = t["esft_experts"]
    return info


COMPARED = {  # figure -> how to read it from an info dict
    "total_params": lambda i: i["total_params"],
    "active_params": lambda i: i["active_params"],
    "flops_per_token": lambda i: i["flops_per_token"],
    "weight_bytes_bf16": lambda i: i["weight_memory_bytes"]["bf16"],
    "kv_cache_bytes_per_1k_tokens_bf16": lambda i: i["kv_cache_bytes_per_1k_tokens"]["bf16"],
}


def _ratios(infos: list[dict[str, Any]]) -> dict[str, list[float]]:
    """Each compared figure of every model relative to the first model's."""
    return {
        name: [get(i) / get(infos[0]) if get(infos[0]) else float("nan") for i in infos]
        for name, get in COMPARED.items()
    }


def _print_info_comparison(comparison: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    infos = comparison["models"]
    first = infos[0]["name"]
    table = Table(title="moekit info: side by side", caption=f"(x): relative to {first}")
    table.add_column("figure")
    for info in infos:
        table.add_column(info["name"], justify="right")

    def rel(value: float, base: float) -> str:
        return f" ({value / base:.2f}x)" if base and value != base else ""

    def row(label: str, get: Any, fmt: Any) -> None:
        base = get(infos[0])
        table.add_row(label, *(fmt(get(i)) + rel(get(i), base) for i in infos))

    row("total parameters", lambda i: i["total_params"], _human)
    row("active parameters / token", lambda i: i["active_params"], _human)
    table.add_row("active fraction", *(f"{i['active_fraction']:.1%}" for i in infos))
    row(
        f"forward FLOPs / token (context {infos[0]['flops_context']})",
        lambda i: i["flops_per_token"],
        _flops,
    )
    table.add_row("layers (MoE)", *(f"{i['num_layers']} ({i['moe_layers']})" for i in infos))
    table.add_row(
        "experts, top-k",
        *(f"{i['num_experts']}, {i['top_k']}" if i["num_experts"] else "dense" for i in infos),
    )
    for dtype in infos[0]["weight_memory_bytes"]:
        row(f"weights in {dtype}", lambda i, d=dtype: i["weight_memory_bytes"][d], _bytes)
    for dtype in infos[0]["kv_cache_bytes_per_1k_tokens"]:
        row(
            f"KV cache / 1k tokens ({dtype})",
            lambda i, d=dtype: i["kv_cache_bytes_per_1k_tokens"][d],
            _bytes,
        )
    if any("kv_latent_cache_bytes_per_1k_tokens" in i for i in infos):
        table.add_row(
            "latent KV cache / 1k tokens (bf16)",
            *(
                _bytes(i["kv_latent_cache_bytes_per_1k_tokens"]["bf16"])
                if "kv_latent_cache_bytes_per_1k_tokens" in i
                else "-"
                for i in infos
            ),
        )
    Console(width=max(120, Console().width)).print(table)


def _print_info_table(info: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    table = Table(title=f"{info['name']}", show_header=False)
    table.add_column("figure")
    table.add_column("value", justify="right")
    table.add_row("total parameters", f"{_human(info['total_params'])} ({info['total_params']:,})")
    table.add_row(
        "active parameters / token", f"{_human(info['active_params'])} ({info['active_params']:,})"
    )
    table.add_row("active fraction", f"{info['active_fraction']:.1%}")
    table.add_row(
        f"forward FLOPs / token (context {info['flops_context']})",
        _flops(info["flops_per_token"]),
    )
    table.add_row("layers (MoE)", f"{info['num_layers']} ({info['moe_layers']})")
    if info["num_experts"]:
        table.add_row("experts, top-k", f"{info['num_experts']}, {info['top_k']}")
    for dtype, n in info["weight_memory_bytes"].items():
        table.add_row(f"weights in {dtype}", _bytes(n))
    for dtype, n in info["kv_cache_bytes_per_1k_tokens"].items():
        table.add_row(f"KV cache / 1k tokens of context ({dtype})", _bytes(n))
    for dtype, n in info.get("kv_latent_cache_bytes_per_1k_tokens", {}).items():
        table.add_row(f"latent KV cache / 1k tokens ({dtype})", _bytes(n))
    tuned = info.get("finetune")
    if tuned:
        table.add_row("fine-tuned from", f"{tuned['base']} ({tuned['method']})")
        table.add_row(
            "trained parameters",
            f"{_human(tuned['trainable_params'])} of {_human(tuned['total_params'])} "
            f"({tuned['trainable_fraction']:.2%})"
            + (" with the adapters (merged now)" if tuned["method"] == "lora" else ""),
        )
        for layer, experts in tuned.get("esft_experts", {}).items():
            table.add_row(f"experts trained, layer {layer}", ", ".join(map(str, experts)))
    console.print(table)

    breakdown = Table(title="parameters by part")
    breakdown.add_column("part")
    breakdown.add_column("total", justify="right")
    breakdown.add_column("active / token", justify="right")
    for part, total in info["total_params_by"].items():
        if total:
            breakdown.add_row(part, _human(total), _human(info["active_params_by"][part]))
    console.print(breakdown)


# ---- bench ---------------------------------------------------------------------------------


def cmd_bench_layer(args: argparse.Namespace) -> int:
    from moekit.bench.layer import bench_layer

    rows = bench_layer(
        prefill_tokens=args.prefill_tokens,
        dim=args.dim,
        repeats=args.repeats,
        shapes=tuple(args.shapes.split(",")),
        phases=tuple(args.phases.split(",")),
        backend=args.backend,
    )
    if args.json:
        _print_json(rows)
        return 0
    from rich.console import Console
    from rich.table import Table

    shapes = sorted({(r["shape"], r["num_experts"], r["top_k"], r["expert_hidden"]) for r in rows})
    caption = "; ".join(f"{n}: E={e}, K={k}, F={f}" for n, e, k, f in shapes)
    table = Table(
        title=f"MoE layer, dim {args.dim}, float32, medians of {args.repeats} (ms)",
        caption=f"{caption}; prefill {args.prefill_tokens} tokens, decode 1",
    )
    impls = sorted({impl for r in rows for impl in r["hf_s"]})
    cols = ["shape", "phase", "pass", "ours", "dense", "dense/ours", "hf/ours"]
    cols += [f"hf {impl}" for impl in impls]
    for col in cols:
        table.add_column(col, justify="left" if col in ("shape", "phase", "pass") else "right")
    for r in rows:
        hf = r["hf_best_s"]
        table.add_row(
            r["shape"],
            r["phase"],
            r["pass"],
            f"{r['ours_s'] * 1e3:.2f}",
            f"{r['dense_s'] * 1e3:.2f}",
            f"{r['dense_over_ours']:.2f}x",
            f"{r['hf_over_ours']:.2f}x" if hf is not None else "n/a",
            *(_ms_or_skip(r["hf_s"].get(impl), impl == r["hf_impl"]) for impl in impls),
        )
    Console(width=max(120, Console().width)).print(table)
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


# ---- train ---------------------------------------------------------------------------------


def cmd_train(args: argparse.Namespace) -> int:
    from moekit.training.config import resolve_run_config, resume_run_config
    from moekit.training.trainer import NonFiniteLossError, TrainingInterruptedError, train

    run_dir = Path(args.out)
    if args.resume and not (args.config or args.preset):
        cfg = resume_run_config(run_dir, args.overrides)
    else:
        cfg = resolve_run_config(
            config_file=_recipe_or_file(args.config), preset=args.preset, overrides=args.overrides
        )
    try:
        result = train(cfg, run_dir, resume=args.resume, verbose=not args.quiet)
    except TrainingInterruptedError as e:
        print(str(e), file=sys.stderr)
        return 128 + e.signum
    except NonFiniteLossError as e:
        print(f"moekit train: {e}", file=sys.stderr)
        return 1
    figures = {
        "run_dir": str(result.run_dir),
        "steps": result.step,
        "tokens": result.tokens,
        "seconds": result.seconds,
        "val_loss": result.val_loss,
        "val_by_domain": result.val_by_domain,
        "skipped_steps": result.skipped_steps,
    }
    if args.json:
        _print_json(figures)
        return 0
    _print_run_summary(run_dir, figures)
    return 0


def _recipe_or_file(name: str | None) -> Path | None:
    """A config file path, or the name of a recipe shipped with moekit (e.g. `demo`)."""
    if name is None:
        return None
    path = Path(name)
    if path.exists():
        return path
    recipe = Path(__file__).parent / "recipes" / f"{name}.yaml"
    if recipe.exists():
        return recipe
    recipes = sorted(p.stem for p in (Path(__file__).parent / "recipes").glob("*.yaml"))
    raise FileNotFoundError(
        f"config {name!r} is neither a file nor a built-in recipe ({', '.join(recipes)})"
    )


def _print_run_summary(run_dir: Path, figures: dict[str, Any]) -> None:
    from rich.console import Console

    console = Console()
    val = figures["val_loss"]
    console.print(
        f"[bold]done[/bold]: {figures['steps']} steps, {figures['tokens']:,} tokens in "
        f"{figures['seconds']:.0f} s; validation loss "
        f"{'n/a' if val is None else f'{val:.4f}'}"
    )
    for name, what in (
        ("config.json", "model config"),
        ("model.safetensors", "weights"),
        ("tokenizer.json", "tokenizer"),
        ("run.json", "resolved run config"),
        ("metrics.jsonl", "metrics, one JSON object per logged step"),
        ("train_state", "checkpoints for --resume"),
        ("report/report.html", "the report: loss curves, expert load, samples"),
        ("report/loss.png", "loss curves"),
        ("report/expert_load.png", "expert load per layer"),
        ("report/samples.json", "sample generations"),
    ):
        path = run_dir / name
        if path.exists():
            console.print(f"  {path}  [dim]{what}[/dim]")


def cmd_compare(args: argparse.Namespace) -> int:
    from moekit.training.compare import compare
    from moekit.training.config import resolve_run_config
    from moekit.training.trainer import NonFiniteLossError, TrainingInterruptedError

    cfg = resolve_run_config(
        config_file=_recipe_or_file(args.config), preset=args.preset, overrides=args.overrides
    )
    try:
        summary = compare(cfg, args.out, dense_total=args.dense_total, verbose=not args.quiet)
    except TrainingInterruptedError as e:
        print(f"{e}\n(run the same compare command again to continue)", file=sys.stderr)
        return 128 + e.signum
    except NonFiniteLossError as e:
        print(f"moekit compare: {e}", file=sys.stderr)
        return 1
    if args.json:
        _print_json(summary)
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"MoE vs dense on the same data and tokens ({args.out})")
    for col in ("run", "total params", "active params", "tokens", "train s", "val loss"):
        table.add_column(col, justify="left" if col == "run" else "right")
    for name, r in summary["runs"].items():
        table.add_row(
            name,
            _human(r["total_params"]),
            _human(r["active_params"]),
            f"{r['tokens']:,}",
            f"{r['train_seconds']:.0f}",
            f"{r['val_loss']:.4f}",
        )
    console = Console()
    console.print(table)
    console.print(
        f"plot: {Path(args.out) / 'compare.png'}; figures: {Path(args.out) / 'compare.json'}"
    )
    return 0


def cmd_bench_generate(args: argparse.Namespace) -> int:
    from moekit.bench.generate import bench_generate

    result = bench_generate(
        args.model_dir,
        preset=args.preset,
        batch_size=args.batch_size,
        prompt_tokens=args.prompt_tokens,
        new_tokens=args.new_tokens,
        repeats=args.repeats,
    )
    if args.json:
        _print_json(result)
        return 0
    print(
        f"greedy generation, {result['model']}, batch {result['batch_size']}, "
        f"{result['prompt_tokens']} prompt + {result['new_tokens']} new tokens, float32:"
    )
    for phase in ("prefill", "decode"):
        ours, hf = result[f"ours_{phase}_tokens_per_s"], result[f"hf_{phase}_tokens_per_s"]
        ratio = result[f"{phase}_ours_over_hf"]
        print(
            f"  {phase:8s} ours {ours:9,.1f} tok/s   transformers {hf:9,.1f} tok/s   {ratio:.2f}x"
        )
    print(f"  same tokens as transformers: {result['same_tokens']}")
    return 0


def cmd_bench_serve(args: argparse.Namespace) -> int:
    from moekit.bench.serve import bench_serve

    result = bench_serve(
        args.model_dir, clients=args.clients, seconds=args.seconds, new_tokens=args.new_tokens
    )
    if args.json:
        _print_json(result)
        return 0
    one, many = result["one_client"], result["many_clients"]
    print(f"server decode throughput, {result['new_tokens']} tokens per request:")
    print(f"  1 client   {one['tokens_per_s']:8,.1f} tokens/s ({one['requests']} requests)")
    print(
        f"  {many['clients']} clients  {many['tokens_per_s']:8,.1f} tokens/s "
        f"({many['requests']} requests; mean decode batch {result['mean_decode_batch']:.1f})"
    )
    print(f"  speed-up   {result['speedup']:.2f}x")
    return 0


def cmd_bench_train(args: argparse.Namespace) -> int:
    from moekit.bench.train import bench_train

    result = bench_train(
        preset=args.preset, batch_size=args.batch_size, seq_len=args.seq_len, repeats=args.repeats
    )
    if args.json:
        _print_json(result)
        return 0
    print(
        f"training step, preset {result['preset']}, batch {result['batch_size']} x "
        f"{result['seq_len']} tokens, float32:"
    )
    print(f"  ours                      {result['ours_tokens_per_s']:10,.0f} tokens/s")
    for impl, tps in result["hf_tokens_per_s"].items():
        print(f"  transformers ({impl:10s}) {tps:10,.0f} tokens/s")
    if result["ours_over_hf_best"] is not None:
        best, ratio = result["hf_best_impl"], result["ours_over_hf_best"]
        print(f"  ours / transformers' best ({best}): {ratio:.2f}x")
    return 0


def cmd_bench_upcycle(args: argparse.Namespace) -> int:
    from moekit.bench.upcycle import bench_upcycle
    from moekit.training.config import resolve_run_config
    from moekit.training.trainer import NonFiniteLossError, TrainingInterruptedError

    config = args.config if args.config or args.preset else "demo"
    cfg = resolve_run_config(
        config_file=_recipe_or_file(config), preset=args.preset, overrides=args.overrides
    )
    try:
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
    except TrainingInterruptedError as e:
        print(f"{e}\n(run the same command again to continue)", file=sys.stderr)
        return 128 + e.signum
    except NonFiniteLossError as e:
        print(f"moekit bench upcycle: {e}", file=sys.stderr)
        return 1
    if args.json:
        _print_json(summary)
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(
        title=f"Sparse upcycling: {summary['dense_steps']} dense steps, then {summary['steps']} "
        f"MoE steps ({summary['num_experts']} experts, top-{summary['top_k']})"
    )
    for col in ("run", "total params", "active params", "steps", "val loss"):
        table.add_column(col, justify="left" if col == "run" else "right")
    for name, r in summary["runs"].items():
        table.add_row(
            name,
            _human(r["total_params"]),
            _human(r["active_params"]),
            f"{r['steps']:,}",
            f"{r['val_loss']:.4f}",
        )
    console = Console()
    console.print(table)
    console.print(
        f"upcycled - scratch: {summary['upcycled_minus_scratch']:+.4f} validation loss "
        f"(negative: the upcycled model is ahead); plot: {Path(args.out) / 'upcycle.png'}"
    )
    return 0


# ---- fine-tuning ---------------------------------------------------------------------------


def cmd_finetune(args: argparse.Namespace) -> int:
    from moekit.training.config import finetune_run_config, resume_run_config
    from moekit.training.trainer import NonFiniteLossError, TrainingInterruptedError, train

    bases = [a for a in args.positional if "=" not in a]
    overrides = [a for a in args.positional if "=" in a]
    if len(bases) > 1:
        raise ValueError(f"expected one base model directory, got {bases}")
    for flag, key in (
        (args.lora_rank, "finetune.lora.rank"),
        (args.lora_alpha, "finetune.lora.alpha"),
        (args.esft_coverage, "finetune.esft_coverage"),
    ):
        if flag is not None:
            overrides.append(f"{key}={flag}")
    if args.lora_targets:
        overrides.append(f"finetune.lora.targets={json.dumps(args.lora_targets.split(','))}")
    if args.resume:
        if bases or args.data:
            raise ValueError(
                "--resume continues the run in --out with its own base model and data; "
                "do not pass BASE_DIR or --data"
            )
        cfg = resume_run_config(args.out, overrides)
    else:
        if not bases or not args.data:
            raise ValueError("a BASE_DIR and --data FILE.jsonl are required")
        cfg = finetune_run_config(
            bases[0],
            args.data,
            method=args.method,
            config_file=args.config,
            overrides=overrides,
        )
    try:
        result = train(cfg, args.out, resume=args.resume, verbose=not args.quiet)
    except TrainingInterruptedError as e:
        print(str(e), file=sys.stderr)
        return 128 + e.signum
    except NonFiniteLossError as e:
        print(f"moekit finetune: {e}", file=sys.stderr)
        return 1
    summary = json.loads((Path(args.out) / "finetune.json").read_text())
    figures = {
        "run_dir": args.out,
        "method": summary["method"],
        "steps": result.step,
        "val_loss": result.val_loss,
        "trainable_params": summary["trainable_params"],
        "total_params": summary["total_params"],
        "trainable_fraction": summary["trainable_fraction"],
    }
    if "esft_experts" in summary:
        figures["esft_experts"] = summary["esft_experts"]
    if args.json:
        _print_json(figures)
        return 0
    _print_run_summary(
        Path(args.out), {**figures, "tokens": result.tokens, "seconds": result.seconds}
    )
    print(
        f"trained {summary['trainable_params']:,} of {summary['total_params']:,} parameters "
        f"({summary['trainable_fraction']:.2%}) with {summary['method']}"
    )
    return 0


def cmd_upcycle(args: argparse.Namespace) -> int:
    from moekit.finetune.upcycle import upcycle

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
    )
    figures = {
        "out": args.out,
        "total_params": count_params(cfg).total,
        "active_params": count_params(cfg).active,
    }
    if args.json:
        _print_json(figures)
    else:
        moe = cfg.moe
        assert moe is not None
        print(
            f"upcycled into {args.out}: {moe.num_experts} experts, top-{moe.top_k}; "
            f"{_human(figures['total_params'])} parameters, "
            f"{_human(figures['active_params'])} active"
        )
    return 0


# ---- analyze / doctor ----------------------------------------------------------------------


def cmd_analyze(args: argparse.Namespace) -> int:
    from moekit.analysis.report import run_analyze

    return run_analyze(args)


def cmd_doctor(args: argparse.Namespace) -> int:
    from moekit.analysis.doctor import run_doctor

    return run_doctor(args)


# ---- convert -------------------------------------------------------------------------------


def cmd_convert(args: argparse.Namespace) -> int:
    from moekit.interop.hf import HFCheckpoint, architecture_of, export_hf, import_hf

    if sum(map(bool, (args.from_hf, args.to_hf, args.to_peft))) != 1:
        raise ValueError(
            "give exactly one of --from-hf HF_DIR, --to-hf MODEL_DIR or --to-peft ADAPTER_DIR"
        )
    if args.to_peft:
        from moekit.finetune.peft import PEFT_CONFIG, export_peft

        out = export_peft(
            args.to_peft, args.out, architecture=args.arch, base_model_name_or_path=args.base_hf
        )
        peft_cfg = json.loads((out / PEFT_CONFIG).read_text())
        figures = {
            "direction": "to-peft",
            "out": args.out,
            "target_modules": len(peft_cfg["target_modules"]),
            "target_parameters": len(peft_cfg["target_parameters"]),
        }
        if args.json:
            _print_json(figures)
        else:
            print(
                f"wrote a PEFT LoRA adapter to {args.out}: {figures['target_modules']} modules, "
                f"{figures['target_parameters']} router or stacked-expert parameters"
            )
        return 0
    if args.from_hf:
        arch = architecture_of(HFCheckpoint(args.from_hf).config).name
        cfg = import_hf(args.from_hf, args.out, dtype=args.dtype)
        figures = {
            "direction": "from-hf",
            "architecture": arch,
            "out": args.out,
            "total_params": count_params(cfg).total,
            "active_params": count_params(cfg).active,
        }
    else:
        arch = export_hf(args.to_hf, args.out, dtype=args.dtype)
        figures = {"direction": "to-hf", "architecture": arch, "out": args.out}
    if args.json:
        _print_json(figures)
    else:
        what = "imported" if args.from_hf else "exported as"
        print(f"{what} {arch}: {args.out}")
    return 0


# ---- generate / chat ----------------------------------------------------------------------


def _sampling_params(args: argparse.Namespace, **extra: Any) -> Any:
    from moekit.infer.sampling import SamplingParams

    return SamplingParams(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        min_p=args.min_p,
        repetition_penalty=args.repetition_penalty,
        seed=args.seed,
        stop=list(args.stop or []) + list(extra.pop("stop", [])),
        experts_per_token=args.experts_per_token,
        **extra,
    )


def cmd_generate(args: argparse.Namespace) -> int:
    from moekit.infer.generate import Generator

    generator = Generator.from_dir(args.model_dir)
    params = _sampling_params(args, return_routing=args.routing)
    if args.json:
        completion = generator.generate(args.prompt, params)[0]
        data: dict[str, Any] = {
            "text": completion.text,
            "token_ids": completion.token_ids,
            "finish_reason": completion.finish_reason,
            "prompt_tokens": completion.prompt_tokens,
        }
        if args.routing:
            data["routing"] = [
                {"token_id": t.id, "layers": {str(k): v for k, v in (t.routing or {}).items()}}
                for t in completion.tokens
            ]
        _print_json(data)
        return 0
    sys.stdout.write(args.prompt)
    for chunk in generator.stream(args.prompt, params):
        sys.stdout.write(chunk.text)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from moekit.infer.chat import ChatTemplate
    from moekit.infer.generate import ContextLengthError, Generator

    generator = Generator.from_dir(args.model_dir)
    template = ChatTemplate.load(args.model_dir)
    params = _sampling_params(args, stop=list(template.stop))
    history: list[dict[str, str]] = []
    if args.system:
        history.append({"role": "system", "content": args.system})
    print("moekit chat: /reset clears the conversation, /quit or Ctrl-D leaves.", file=sys.stderr)
    while True:
        try:
            line = input("you> ")
        except EOFError:
            print(file=sys.stderr)
            return 0
        if line.strip() in ("/quit", "/exit"):
            return 0
        if line.strip() == "/reset":
            history = history[:1] if args.system else []
            continue
        if not line.strip():
            continue
        history.append({"role": "user", "content": line})
        reply = ""
        while True:
            prompt = template.format(history)
            try:
                sys.stdout.write("model> ")
                for chunk in generator.stream(prompt, params):
                    reply += chunk.text
                    sys.stdout.write(chunk.text)
                    sys.stdout.flush()
                break
            except ContextLengthError:
                # Forget the oldest exchange (keeping any system message) and try again.
                first = 1 if args.system else 0
                if len(history) - first <= 1:
                    print("\n(the message is too long for the model's context)", file=sys.stderr)
                    history.pop()
                    break
                del history[first : first + 2]
        sys.stdout.write("\n")
        if reply:
            history.append({"role": "assistant", "content": reply.strip()})


def cmd_serve(args: argparse.Namespace) -> int:
    from moekit.serve.app import serve

    api_key = args.api_key or os.environ.get("MOEKIT_API_KEY")
    base = f"http://{args.host}:{args.port}"

    def ready() -> None:
        page = f"{base}/?key=..." if api_key else f"{base}/"
        print(
            f"serving {args.model_dir} at {base}/v1 (OpenAI-compatible API) and {page} "
            "(playground); Ctrl-C stops",
            file=sys.stderr,
        )

    serve(
        args.model_dir,
        host=args.host,
        port=args.port,
        api_key=api_key,
        model_name=args.model_name,
        max_batch=args.max_batch,
        max_queue=args.max_queue,
        max_tokens_limit=args.max_tokens,
        max_context=args.max_context,
        on_ready=ready,
    )
    return 0


def _add_sampling_flags(p: argparse.ArgumentParser, *, default_temperature: float) -> None:
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument(
        "--temperature", type=float, default=default_temperature, help="0 means greedy decoding"
    )
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0, help="0 means off")
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", help="a stop string (repeatable)")
    p.add_argument(
        "--experts-per-token", type=int, default=None, help="route each token to this many experts"
    )


# ---- parser --------------------------------------------------------------------------------


def _add_run_arguments(
    parser: argparse.ArgumentParser, *, config_help: str, out_help: str, json_help: str
) -> None:
    """The arguments of the commands that train from a run config: dotted overrides,
    --config, --preset, --out, --quiet and --json."""
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="dotted overrides, e.g. train.max_steps=200 model.moe.num_experts=16",
    )
    parser.add_argument("--config", help=config_help)
    parser.add_argument("--preset", help="start the model section from this preset")
    parser.add_argument("--out", required=True, help=out_help)
    parser.add_argument("--quiet", action="store_true", help="no progress output")
    parser.add_argument("--json", action="store_true", help=json_help)


def build_parser() -> argparse.ArgumentParser:
    from moekit import __version__

    parser = argparse.ArgumentParser(
        prog="moekit",
        description="Build, train, inspect, convert and serve Mixture-of-Experts models.",
    )
    parser.add_argument("--version", action="version", version=f"moekit {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    info = sub.add_parser(
        "info",
        help="parameters, FLOPs and memory of a preset or model directory",
        description=_doc("moekit.params", "summary"),
    )
    info.add_argument(
        "target",
        nargs="*",
        help="a preset name or a model directory; two or more: side by side",
    )
    info.add_argument("--list", action="store_true", help="list the presets")
    info.add_argument("--context", type=int, default=2048, help="context length for FLOPs")
    info.add_argument("--json", action="store_true", help="print JSON instead of tables")
    info.set_defaults(func=cmd_info)

    tr = sub.add_parser(
        "train",
        help="train a model and write a model directory",
        description=_doc("moekit.training.trainer", "train"),
    )
    _add_run_arguments(
        tr,
        config_help="a YAML/JSON run config, or a built-in recipe name (demo)",
        out_help="the run / model directory to write",
        json_help="print the final figures as JSON",
    )
    tr.add_argument("--resume", action="store_true", help="continue the run in --out")
    tr.set_defaults(func=cmd_train)

    cmp_ = sub.add_parser(
        "compare",
        help="train an MoE and dense baselines on the same data and tokens",
        description=_doc("moekit.training.compare", "compare"),
    )
    _add_run_arguments(
        cmp_,
        config_help="a YAML/JSON run config, or a recipe name (demo)",
        out_help="directory for the runs and the comparison",
        json_help="print the figures as JSON",
    )
    cmp_.add_argument(
        "--dense-total", action="store_true", help="also train a dense model of equal total size"
    )
    cmp_.set_defaults(func=cmd_compare)

    ft = sub.add_parser(
        "finetune",
        help="fine-tune a model directory on prompt/completion or chat examples",
        description=_doc("moekit.finetune.config", "FinetuneConfig"),
    )
    # One positional list (the base directory is its item without "="): with a separate
    # optional BASE_DIR, `--resume --out D train.lr=1e-4` would take the override for it.
    ft.add_argument(
        "positional",
        nargs="*",
        metavar="BASE_DIR [KEY=VALUE ...]",
        help="the model directory to start from (not with --resume), then dotted overrides, "
        "e.g. train.max_steps=500 finetune.lora.dropout=0.05",
    )
    ft.add_argument("--data", help="a .jsonl file of examples")
    ft.add_argument("--out", required=True, help="the fine-tuned model directory to write")
    ft.add_argument(
        "--method",
        choices=["lora", "full", "esft"],
        default="lora",
        help="lora: low-rank adapters only (default); full: every weight; esft: only the experts "
        "the data routes to most",
    )
    ft.add_argument("--lora-rank", type=int, default=None, help="adapter rank (default 8)")
    ft.add_argument(
        "--lora-alpha", type=float, default=None, help="update scale alpha / rank (default 16)"
    )
    ft.add_argument(
        "--lora-targets",
        help="comma-separated weight-name patterns (default: attention, experts, shared "
        "experts and dense MLPs; add *.ffn.router to adapt routers)",
    )
    ft.add_argument(
        "--esft-coverage",
        type=float,
        default=None,
        help="esft: per layer, train the fewest experts holding this share of the routing "
        "weight (default 0.5)",
    )
    ft.add_argument("--config", help="a YAML/JSON file with train/finetune sections")
    ft.add_argument("--resume", action="store_true", help="continue the run in --out")
    ft.add_argument("--quiet", action="store_true", help="no progress output")
    ft.add_argument("--json", action="store_true", help="print the final figures as JSON")
    ft.set_defaults(func=cmd_finetune)

    up = sub.add_parser(
        "upcycle",
        help="turn a dense model directory into an MoE (sparse upcycling)",
        description=_doc("moekit.finetune.upcycle", "upcycle"),
    )
    up.add_argument("dense_dir")
    up.add_argument("--experts", type=int, default=8)
    up.add_argument("--top-k", type=int, default=2)
    up.add_argument("--granularity", type=int, default=1, help="fine-grained slices per copy")
    up.add_argument("--noise", type=float, default=0.0, help="multiplicative noise on copies")
    up.add_argument(
        "--first-dense-layers", type=int, default=0, help="layers that stay dense at the start"
    )
    up.add_argument("--layer-step", type=int, default=1, help="every k-th layer after is MoE")
    up.add_argument("--seed", type=int, default=0)
    up.add_argument("--out", required=True)
    up.add_argument("--json", action="store_true")
    up.set_defaults(func=cmd_upcycle)

    from moekit.analysis.doctor import add_doctor_arguments
    from moekit.analysis.report import add_analyze_arguments

    ana = sub.add_parser(
        "analyze",
        help="routing analysis: load, specialisation, top tokens, consistency, co-activation",
        description=_doc("moekit.analysis.report", "analyze"),
    )
    add_analyze_arguments(ana)
    ana.set_defaults(func=cmd_analyze)

    doc = sub.add_parser(
        "doctor",
        help="check a model directory (and its training run) for silent MoE failures",
        description=_doc("moekit.analysis.doctor", "diagnose"),
    )
    add_doctor_arguments(doc)
    doc.set_defaults(func=cmd_doctor)

    conv = sub.add_parser(
        "convert",
        help="convert Hugging Face checkpoints to moekit model directories and back",
        description=_doc("moekit.interop.hf", "import_hf")
        + " "
        + _doc("moekit.interop.hf", "export_hf"),
    )
    conv.add_argument("--from-hf", metavar="HF_DIR", help="import this Hugging Face checkpoint")
    conv.add_argument("--to-hf", metavar="MODEL_DIR", help="export this moekit model directory")
    conv.add_argument(
        "--to-peft",
        metavar="ADAPTER_DIR",
        help="write this LoRA adapter (or a LoRA fine-tuned model's adapter/) in PEFT's format, "
        "for the base model exported with --to-hf",
    )
    conv.add_argument(
        "--arch",
        help="with --to-peft: the architecture the base was exported as (default: the one "
        "--to-hf picks)",
    )
    conv.add_argument(
        "--base-hf",
        default="",
        help="with --to-peft: the exported base's path or hub name, recorded for PEFT",
    )
    conv.add_argument("--out", required=True, help="the directory to write")
    conv.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                      help="convert the weights (default: keep them as stored)")  # fmt: skip
    conv.add_argument("--json", action="store_true", help="print the result as JSON")
    conv.set_defaults(func=cmd_convert)

    gen = sub.add_parser(
        "generate",
        help="continue a prompt with a trained model (streams to the terminal)",
        description=_doc("moekit.infer.generate", "Generator"),
    )
    gen.add_argument("model_dir")
    gen.add_argument("prompt")
    _add_sampling_flags(gen, default_temperature=0.8)
    gen.add_argument("--routing", action="store_true", help="with --json: each token's experts")
    gen.add_argument(
        "--json", action="store_true", help="print {text, token_ids, ...} instead of streaming"
    )
    gen.set_defaults(func=cmd_generate)

    srv = sub.add_parser(
        "serve",
        help="an OpenAI-compatible HTTP API and a playground page",
        description=_doc("moekit.serve.app", "serve"),
    )
    srv.add_argument("model_dir")
    srv.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    srv.add_argument("--port", type=int, default=8000)
    srv.add_argument(
        "--api-key", help="require 'Authorization: Bearer KEY' (or set MOEKIT_API_KEY)"
    )
    srv.add_argument("--model-name", help="the model id clients use (default: the folder name)")
    srv.add_argument("--max-batch", type=int, default=8, help="requests decoded together")
    srv.add_argument("--max-queue", type=int, default=64, help="waiting requests before 429")
    srv.add_argument("--max-tokens", type=int, default=None, help="cap on max_tokens per request")
    srv.add_argument(
        "--max-context",
        type=int,
        default=None,
        help="prompt + new tokens per request; sizes the KV cache (default: the model's "
        "context, at most 4096)",
    )
    srv.set_defaults(func=cmd_serve, json=False)

    chat = sub.add_parser("chat", help="an interactive chat with a model in the terminal")
    chat.add_argument("model_dir")
    chat.add_argument("--system", help="a system message")
    _add_sampling_flags(chat, default_temperature=0.7)
    chat.set_defaults(func=cmd_chat, json=False)

    bench = sub.add_parser("bench", help="benchmarks that print ratios measured in one run")
    bench_sub = bench.add_subparsers(dest="bench_command", metavar="BENCH", required=True)
    layer = bench_sub.add_parser(
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
    layer.add_argument("--dim", type=int, default=512, help="model dimension (default 512)")
    layer.add_argument("--repeats", type=int, default=5, help="timed samples per figure")
    layer.add_argument("--shapes", default="coarse,fine", help="comma list of coarse,fine")
    layer.add_argument("--phases", default="prefill,decode", help="comma list of prefill,decode")
    layer.add_argument(
        "--prefill-tokens", type=int, default=4096, help="tokens in the prefill phase"
    )
    layer.add_argument("--backend", default="auto", help="expert backend for ours")
    layer.add_argument("--json", action="store_true", help="print JSON rows instead of a table")
    layer.set_defaults(func=cmd_bench_layer)
    bgen = bench_sub.add_parser(
        "generate",
        help="generation speed: ours vs transformers' generate on the same weights",
        description=_doc("moekit.bench.generate", "bench_generate"),
    )
    bgen.add_argument("model_dir", nargs="?", help="a model directory (default: a random preset)")
    bgen.add_argument("--preset", default="demo", help="used without a model directory")
    bgen.add_argument("--batch-size", type=int, default=1)
    bgen.add_argument("--prompt-tokens", type=int, default=128)
    bgen.add_argument("--new-tokens", type=int, default=64)
    bgen.add_argument("--repeats", type=int, default=3)
    bgen.add_argument("--json", action="store_true", help="print JSON")
    bgen.set_defaults(func=cmd_bench_generate)
    bsrv = bench_sub.add_parser(
        "serve",
        help="server throughput with 1 vs N concurrent clients",
        description=_doc("moekit.bench.serve", "bench_serve"),
    )
    bsrv.add_argument("model_dir")
    bsrv.add_argument("--clients", type=int, default=8)
    bsrv.add_argument("--seconds", type=float, default=20.0, help="per measurement")
    bsrv.add_argument("--new-tokens", type=int, default=32, help="tokens per request")
    bsrv.add_argument("--json", action="store_true", help="print JSON")
    bsrv.set_defaults(func=cmd_bench_serve)
    bup = bench_sub.add_parser(
        "upcycle",
        help="upcycled dense model vs the same MoE from scratch, same steps",
        description=_doc("moekit.bench.upcycle", "bench_upcycle"),
    )
    _add_run_arguments(
        bup,
        config_help="run config or recipe (default: demo, unless --preset is given)",
        out_help="directory for the runs and the figures",
        json_help="print JSON",
    )
    bup.add_argument("--dense-steps", type=int, default=300, help="steps of the dense model")
    bup.add_argument("--steps", type=int, default=300, help="MoE steps, upcycled and scratch")
    bup.add_argument("--granularity", type=int, default=1, help="fine-grained slices per copy")
    bup.add_argument("--noise", type=float, default=0.0, help="multiplicative noise on copies")
    bup.add_argument(
        "--no-dense-continue",
        action="store_true",
        help="skip the dense model trained for the same extra steps",
    )
    bup.set_defaults(func=cmd_bench_upcycle)

    btrain = bench_sub.add_parser(
        "train",
        help="training step throughput: ours vs transformers' Mixtral",
        description=_doc("moekit.bench.train", "bench_train"),
    )
    btrain.add_argument("--preset", default="demo", help="a Mixtral-compatible preset")
    btrain.add_argument("--batch-size", type=int, default=16)
    btrain.add_argument("--seq-len", type=int, default=256)
    btrain.add_argument("--repeats", type=int, default=5, help="timed steps per candidate")
    btrain.add_argument("--json", action="store_true", help="print JSON")
    btrain.set_defaults(func=cmd_bench_train)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from moekit.runtime import tune_cpu_allocator

    tune_cpu_allocator()
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        # Dotted overrides after options ("BASE --out D train.lr=1e-4") are left over by
        # argparse once a positional list has been matched; they belong to that list.
        slot = next((n for n in ("overrides", "positional") if hasattr(args, n)), None)
        if slot is None or any(a.startswith("-") or "=" not in a for a in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        getattr(args, slot).extend(extra)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args))
    except (ValueError, FileNotFoundError) as e:
        print(f"moekit {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
