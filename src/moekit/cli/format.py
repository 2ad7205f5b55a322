"""How the commands print: JSON, human-readable numbers, and rich tables and consoles."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from moekit.files import json_safe
from moekit.model_dir import ModelDir


def print_json(data: Any, *, indent: int = 2) -> None:
    """One JSON document on stdout (non-finite numbers as null: JSON has no NaN)."""
    print(json.dumps(json_safe(data), indent=indent, allow_nan=False))


def human(n: float) -> str:
    """A parameter count the way model cards write it: 46.70B, 1.28B, 386.37K."""
    for threshold, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= threshold:
            return f"{n / threshold:.2f}{suffix}"
    return f"{n:.0f}"


def flops(n: float) -> str:
    for threshold, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K")):
        if n >= threshold:
            return f"{n / threshold:.2f} {prefix}FLOP"
    return f"{n:.0f} FLOP"


def nbytes(n: float) -> str:
    for threshold, suffix in ((2**40, "TiB"), (2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
        if n >= threshold:
            return f"{n / threshold:.2f} {suffix}"
    return f"{n:.0f} B"


def maybe(x: float | None, digits: int = 3) -> str:
    """`x` with `digits` decimals, or "n/a"."""
    return "n/a" if x is None else f"{x:.{digits}f}"


def console(*, wide: bool = False, stderr: bool = False) -> Any:
    """A rich console (at least 120 columns wide with `wide`, for tables with many columns)."""
    from rich.console import Console

    if wide:
        return Console(width=max(120, Console().width), stderr=stderr)
    return Console(stderr=stderr)


def table(title: str, columns: list[str], *, right: set[str] | None = None, **kwargs: Any) -> Any:
    """A rich table with `columns`, those in `right` right-aligned (numbers)."""
    from rich.table import Table

    t = Table(title=title, **kwargs)
    for col in columns:
        t.add_column(col, justify="right" if right and col in right else "left")
    return t


# What a run directory holds, in the order `print_run_files` lists it.
RUN_FILES = (
    (ModelDir.CONFIG, "model config"),
    (ModelDir.WEIGHTS, "weights"),
    (ModelDir.TOKENIZER, "tokenizer"),
    (ModelDir.RUN_CONFIG, "resolved run config"),
    (ModelDir.METRICS, "metrics, one JSON object per logged step"),
    (ModelDir.TRAIN_STATE, "checkpoints for --resume"),
    (f"{ModelDir.REPORT}/report.html", "the report: loss curves, expert load, samples"),
    (f"{ModelDir.REPORT}/loss.png", "loss curves"),
    (f"{ModelDir.REPORT}/expert_load.png", "expert load per layer"),
    (f"{ModelDir.REPORT}/samples.json", "sample generations"),
)


def print_run_summary(
    run_dir: Path, steps: int, tokens: int, seconds: float, val: float | None
) -> None:
    """The end of a training run: its figures, then each file it wrote that exists."""
    out = console()
    out.print(
        f"[bold]done[/bold]: {steps} steps, {tokens:,} tokens in {seconds:.0f} s; validation "
        f"loss {maybe(val, 4)}"
    )
    for name, what in RUN_FILES:
        path = run_dir / name
        if path.exists():
            out.print(f"  {path}  [dim]{what}[/dim]")
