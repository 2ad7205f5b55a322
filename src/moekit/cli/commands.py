"""The `moekit` command: one subcommand per module of this package, each a thin call into the
library (its `add_parser` declares the flags, its `run` calls the library and prints)."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from moekit.cli.common import Exit

# In `moekit --help` order; each names a module of moekit.cli (a hyphen in the command is an
# underscore in the module's name: `module_of`).
COMMANDS = (
    "info",
    "train",
    "compare",
    "finetune",
    "upcycle",
    "experts",
    "analyze",
    "doctor",
    "compare-routing",
    "convert",
    "quantize",
    "generate",
    "serve",
    "chat",
    "plan",
    "bench",
    "evidence",
)


# Commands that stream weights tensor by tensor keep glibc's own allocator: the tuned one
# (moekit.runtime.tune_cpu_allocator) keeps every freed block, which for a stream of large
# tensors of changing sizes adds up (quantising OLMoE-1B-7B: 8.1 GB peak against 3.6 GB).
STREAMING_COMMANDS = ("quantize", "convert")


def build_parser() -> argparse.ArgumentParser:
    from moekit.version import __version__

    parser = argparse.ArgumentParser(
        prog="moekit",
        description="Build, train, inspect, convert and serve Mixture-of-Experts models.",
    )
    parser.add_argument("--version", action="version", version=f"moekit {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(module_of(name)).add_parser(sub)
    return parser


def module_of(command: str) -> str:
    """The module of moekit.cli that implements `command`."""
    return f"moekit.cli.{command.replace('-', '_')}"


def main(argv: Sequence[str] | None = None) -> int:
    """Run the `moekit` command line with `argv` (default: sys.argv); returns the exit
    status: 0 on success, 2 for a usage error or bad input (printed as one line naming the
    problem), 130 on Ctrl-C, and what a command reports otherwise."""
    from moekit.runtime import tune_cpu_allocator

    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if args.command not in STREAMING_COMMANDS:
        tune_cpu_allocator()
    if extra:
        # Dotted overrides after options ("BASE --out D train.lr=1e-4") are left over by
        # argparse once a positional list has been matched; they belong to that list.
        slot = next((n for n in ("overrides", "positional") if hasattr(args, n)), None)
        if slot is None or any(a.startswith("-") or "=" not in a for a in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        getattr(args, slot).extend(extra)
    if not getattr(args, "run", None):
        parser.print_help()
        return 2
    command = args.command + (f" {args.bench_command}" if args.command == "bench" else "")
    try:
        return int(args.run(args))
    except Exit as e:
        return e.code
    except (ValueError, FileNotFoundError) as e:
        print(f"moekit {command}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a full disk outside a training run (convert, upcycle, ...)
        from moekit.files import DiskFullError

        if not isinstance(e, DiskFullError):
            raise
        print(f"moekit {command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
