"""What the commands share: docstrings as help, run-config and sampling flags, the device
flag, recipes, and the one place training errors become exit codes."""

from __future__ import annotations

import argparse
import ast
import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

PACKAGE = Path(__file__).resolve().parent.parent  # src/moekit


class Exit(Exception):  # noqa: N818 (a control-flow signal, not an error)
    """Leave the command with exit status `code` (what it had to say is already printed)."""

    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


def doc(module: str, name: str) -> str:
    """The first paragraph of a library function's or class's docstring, for `--help`.

    Read from the source file without importing anything, so `moekit --help` and the light
    commands never pay for importing torch."""
    parts = module.split(".")
    assert parts[0] == "moekit", module
    path = PACKAGE.joinpath(*parts[1:])
    path = path / "__init__.py" if path.is_dir() else path.with_suffix(".py")
    tree = ast.parse(path.read_text())
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.ClassDef) and node.name == name:
            text = ast.get_docstring(node) or ""
            return " ".join(text.split("\n\n")[0].split())
    raise LookupError(f"{module} defines no {name}")  # a renamed function: fail in tests


def add_run_arguments(
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


def run_config(args: argparse.Namespace, *, default_recipe: str | None = None) -> Any:
    """The RunConfig of --config (a file or recipe), --preset and the dotted overrides; with
    neither --config nor --preset, `default_recipe`."""
    from moekit.training.config import resolve_run_config

    config = args.config
    if config is None and args.preset is None:
        config = default_recipe
    return resolve_run_config(config_file=config, preset=args.preset, overrides=args.overrides)


def add_device_argument(parser: argparse.ArgumentParser) -> None:
    from moekit.runtime import DEVICES_HELP

    parser.add_argument("--device", default="auto", help=f"where the model runs: {DEVICES_HELP}")


def add_compile_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="decode through torch.compile: faster tokens after a one-off compilation of "
        "seconds to a minute (see docs/inference.md)",
    )


def add_offload_arguments(parser: argparse.ArgumentParser) -> None:
    """--max-memory and the expert-cache flags (see moekit.infer.offload)."""

    def size(text: str) -> int:
        from moekit.files import parse_size

        try:
            return parse_size(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    parser.add_argument(
        "--max-memory",
        type=size,
        metavar="SIZE",
        help="page the routed experts from the weight files to keep the weights within SIZE "
        "(e.g. 6GiB, 500MB); the other weights stay in memory",
    )
    parser.add_argument(
        "--expert-cache",
        choices=("lru", "lfu"),
        default="lru",
        help="with --max-memory: which expert a full cache drops (least recently or least "
        "frequently used; default lru)",
    )
    parser.add_argument(
        "--no-prefetch",
        action="store_true",
        help="with --max-memory: do not guess and read the next layer's experts ahead",
    )


def offload_config(args: argparse.Namespace) -> Any:
    """The OffloadConfig the offload flags ask for, or None without --max-memory."""
    if args.max_memory is None:
        return None
    from moekit.infer.offload import OffloadConfig

    return OffloadConfig(
        max_memory=args.max_memory, policy=args.expert_cache, prefetch=not args.no_prefetch
    )


# Sampling flags left out take the model's own default (its generation_config.json), else these.
_SAMPLING_FALLBACKS = {"top_p": 1.0, "top_k": 0, "repetition_penalty": 1.0}


def add_sampling_arguments(p: argparse.ArgumentParser, *, default_temperature: float) -> None:
    model = "default: the model's generation_config.json, else"
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument(
        "--temperature",
        type=float,
        default=None,
        help=f"0 means greedy decoding ({model} {default_temperature})",
    )
    p.add_argument("--top-p", type=float, default=None, help=f"({model} 1.0)")
    p.add_argument("--top-k", type=int, default=None, help=f"0 means off ({model} 0)")
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--repetition-penalty", type=float, default=None, help=f"({model} 1.0)")
    p.set_defaults(fallback_temperature=default_temperature)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", help="a stop string (repeatable)")
    p.add_argument(
        "--experts-per-token", type=int, default=None, help="route each token to this many experts"
    )


def sampling_params(
    args: argparse.Namespace, model_defaults: dict[str, Any] | None = None, **extra: Any
) -> Any:
    """SamplingParams from `add_sampling_arguments`' flags (and `extra` fields); a flag left
    out takes `model_defaults` (GenerationDefaults.sampling()), else moekit's default."""
    from moekit.infer.sampling import SamplingParams

    fallbacks = {**_SAMPLING_FALLBACKS, "temperature": args.fallback_temperature}
    chosen = {
        name: value if (value := getattr(args, name)) is not None
        else (model_defaults or {}).get(name, fallback)
        for name, fallback in fallbacks.items()
    }  # fmt: skip
    return SamplingParams(
        max_new_tokens=args.max_new_tokens,
        min_p=args.min_p,
        **chosen,
        seed=args.seed,
        stop=list(args.stop or []) + list(extra.pop("stop", [])),
        experts_per_token=args.experts_per_token,
        **extra,
    )


@contextlib.contextmanager
def training_errors(command: str, *, resume_hint: str) -> Iterator[None]:
    """Turn a training run's stops into exit codes: a signal that saved a checkpoint exits
    with 128 + the signal number and says how to continue (`resume_hint`); a run stopped by
    non-finite losses or by a full disk exits with 1."""
    from moekit.training.trainer import (
        NonFiniteLossError,
        RunDiskFullError,
        TrainingInterruptedError,
    )

    try:
        yield
    except TrainingInterruptedError as e:
        print(f"{e}; continue with `{resume_hint}`", file=sys.stderr)
        raise Exit(128 + e.signum) from None
    except NonFiniteLossError as e:
        print(f"moekit {command}: {e}", file=sys.stderr)
        raise Exit(1) from None
    except RunDiskFullError as e:
        if e.checkpoint_step is None:
            kept = "no checkpoint was written yet"
        else:
            kept = (
                f"the last complete checkpoint is at step {e.checkpoint_step}: free some space "
                f"and continue with `{resume_hint}`"
            )
        print(f"moekit {command}: {e.problem}; the run stopped at step {e.step}; {kept}",
              file=sys.stderr)  # fmt: skip
        raise Exit(1) from None


@contextlib.contextmanager
def run_dir_hints() -> Iterator[None]:
    """The library's refusals to start or continue a run in a directory, said with the
    flags that fix them (--out, --resume)."""
    from moekit.training.errors import (
        ExistingModelError,
        ExistingRunError,
        NothingToResumeError,
        ResumeMismatchError,
    )

    try:
        yield
    except ExistingRunError as e:
        raise ValueError(
            f"{e.run_dir} already holds a training run (a checkpoint at step {e.step}); pass "
            "--resume to continue it or choose another --out"
        ) from None
    except ExistingModelError as e:
        raise ValueError(
            f"{e.run_dir} already holds a model ({', '.join(e.files)}) and no training run to "
            "continue; choose another --out (a run never overwrites a model)"
        ) from None
    except NothingToResumeError as e:
        raise FileNotFoundError(
            f"--resume: {e.run_dir} holds {e.missing}; start the run without --resume"
        ) from None
    except ResumeMismatchError as e:
        hint = "; drop that override" if e.setting is not None else ""
        raise ValueError(f"--resume: {e.problem}{hint}") from None


def add_ep_argument(parser: argparse.ArgumentParser, command: str) -> None:
    parser.add_argument(
        "--ep",
        type=int,
        default=None,
        help="under torchrun: split each MoE layer's experts over the N processes it started "
        f"(`torchrun --nproc-per-node N -m moekit {command} ... --ep N`); the main process "
        "runs the model, the others serve their experts",
    )


def check_ep(args: argparse.Namespace, command: str) -> None:
    """Refuse an `--ep` this launch cannot take, before anything loads."""
    from moekit.training.distributed import launched_world

    world = launched_world()
    if world == 1 or args.ep != world:
        raise ValueError(
            f"--ep {args.ep} splits the experts over {args.ep} processes: start them with "
            f"`torchrun --nproc-per-node {args.ep} -m moekit {command} ... --ep {args.ep}`"
            + (f" (this is one of {world})" if world > 1 else "")
        )
    if getattr(args, "max_memory", None) is not None:
        raise ValueError("--ep and --max-memory do not combine: each process holds its experts")
    import os

    import torch

    if torch.cuda.is_available():  # one GPU per process, as torchrun numbers them
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))


# ---- speculative decoding (generate, bench generate, serve) -----------------------------------


def add_speculative_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--speculative",
        choices=["ngram", "draft"],
        default=None,
        help="speculative decoding: drafts from prompt lookup (ngram) or a small draft model "
        "(draft, with --draft), checked by the model in one pass",
    )
    p.add_argument(
        "--draft",
        metavar="MODEL_DIR",
        default=None,
        help="with --speculative draft: the draft model (same tokenizer as the model)",
    )
    p.add_argument(
        "--num-draft-tokens",
        type=int,
        default=None,
        metavar="K",
        help="with --speculative: tokens drafted per step, 1 to 16 (default 4)",
    )


def speculative_config(args: argparse.Namespace) -> Any:
    """The SpeculativeConfig of `add_speculative_arguments`' flags, or None without
    --speculative; a ValueError in flag terms for a flag that does not fit the others."""
    from moekit.infer.speculative import MAX_DRAFT_TOKENS, SpeculativeConfig

    method, draft, k = args.speculative, args.draft, args.num_draft_tokens
    if method is None:
        if draft is not None:
            raise ValueError("--draft MODEL_DIR needs --speculative draft")
        if k is not None:
            raise ValueError("--num-draft-tokens needs --speculative ngram or --speculative draft")
        return None
    if method == "draft" and draft is None:
        raise ValueError("--speculative draft needs --draft MODEL_DIR (a small model directory)")
    if method != "draft" and draft is not None:
        raise ValueError(
            "--draft is for --speculative draft; prompt lookup (--speculative ngram) drafts "
            "without a second model"
        )
    if k is not None and not 1 <= k <= MAX_DRAFT_TOKENS:
        raise ValueError(f"--num-draft-tokens {k} is out of range: use 1 to {MAX_DRAFT_TOKENS}")
    return SpeculativeConfig(method=method, draft_dir=draft, num_draft_tokens=k or 4)
