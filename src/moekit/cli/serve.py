"""`moekit serve`: an OpenAI-compatible HTTP API and a playground page."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from moekit.cli.common import (
    add_compile_argument,
    add_device_argument,
    add_ep_argument,
    add_offload_arguments,
    add_speculative_arguments,
    check_ep,
    doc,
    offload_config,
    speculative_config,
)


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "serve",
        help="an OpenAI-compatible HTTP API and a playground page",
        description=doc("moekit.serve.server", "serve"),
    )
    p.add_argument("model_dir")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' (or set MOEKIT_API_KEY)")
    p.add_argument("--model-name", help="the model id clients use (default: the folder name)")
    p.add_argument("--max-batch", type=int, default=8, help="requests decoded together")
    p.add_argument("--max-queue", type=int, default=64, help="waiting requests before 429")
    p.add_argument("--max-tokens", type=int, default=None, help="cap on max_tokens per request")
    p.add_argument(
        "--max-context",
        type=int,
        default=None,
        help="prompt + new tokens per request; sizes the KV cache (default: the model's "
        "context, at most 4096)",
    )
    add_device_argument(p)
    add_offload_arguments(p)
    add_compile_argument(p)
    add_ep_argument(p, "serve")
    _add_connection_arguments(p)
    p.add_argument(
        "--prefill-chunk",
        type=int,
        default=512,
        metavar="N",
        help="prompt tokens prefilled between two decode steps of the running requests, so a "
        "long prompt does not stall them (0: whole prompts at once; default 512)",
    )
    _add_engine_arguments(p)
    p.add_argument(
        "--shutdown-grace",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="on SIGTERM, refuse new requests and let running ones finish for up to this "
        "long, then abort the rest (default 30; a second SIGTERM or Ctrl-C stops at once)",
    )
    p.add_argument(
        "--tool-call-format",
        default=None,
        metavar="FORMAT",
        help="the format the model writes tool calls in: hermes, mistral, llama3_json or "
        "deepseek_v3 (default: the one its chat template shows; hermes when it shows none)",
    )
    p.set_defaults(run=run, json=False)


def _add_connection_arguments(p: argparse.ArgumentParser) -> None:
    """What a connection may do, and who may connect."""
    p.add_argument(
        "--header-timeout",
        type=float,
        default=10.0,
        metavar="S",
        help="seconds a client has to send a request's head, from connecting (default 10)",
    )
    p.add_argument(
        "--body-timeout",
        type=float,
        default=30.0,
        metavar="S",
        help="seconds a client has to send a request's body, after its head (default 30)",
    )
    p.add_argument(
        "--max-connections",
        type=int,
        default=256,
        metavar="N",
        help="open connections at most; past it, new ones get a 503 (default 256)",
    )
    p.add_argument(
        "--allowed-hosts",
        action="append",
        default=[],
        metavar="HOST[,HOST...]",
        help="host names the server answers to besides IP addresses and localhost, e.g. the "
        "name it is reached by (*.example.com for a domain, * for any); repeatable",
    )
    p.add_argument(
        "--allowed-origins",
        action="append",
        default=[],
        metavar="ORIGIN[,ORIGIN...]",
        help="web pages allowed to call the API, as scheme://host[:port] (* for any), with "
        "CORS; repeatable",
    )


def _add_engine_arguments(p: Any) -> None:
    """The engine's prefix cache and speculation."""
    add_speculative_arguments(p)
    p.add_argument(
        "--prefix-cache-tokens",
        type=int,
        default=None,
        metavar="N",
        help="prompt tokens whose keys and values are kept for later prompts that start the "
        "same way, e.g. a shared system prompt (0: off; default: a quarter of --max-batch x "
        "--max-context)",
    )


# The library names a bad setting by its keyword; the command line adds the flag.
FLAGS = {
    "model_name": "--model-name",
    "max_batch": "--max-batch",
    "max_queue": "--max-queue",
    "max_tokens_limit": "--max-tokens",
    "max_context": "--max-context",
    "header_timeout_s": "--header-timeout",
    "body_timeout_s": "--body-timeout",
    "max_connections": "--max-connections",
    "allowed_hosts": "--allowed-hosts",
    "allowed_origins": "--allowed-origins",
    "prefill_chunk": "--prefill-chunk",
    "shutdown_grace": "--shutdown-grace",
    "tool_call_format": "--tool-call-format",
    "prefix_cache_tokens": "--prefix-cache-tokens",
    "speculative_tokens": "--num-draft-tokens",
    "draft_dir": "--draft",
}


def _speculative_tokens(args: argparse.Namespace) -> int:
    """The drafts per step --speculative asks for (0 without it)."""
    config = speculative_config(args)
    return 0 if config is None else int(config.num_draft_tokens)


def split_list(values: list[str]) -> list[str]:
    """Repeated flags, each a comma-separated list, as one list."""
    return [item.strip() for value in values for item in value.split(",") if item.strip()]


def run(args: argparse.Namespace) -> int:
    if args.ep is None:
        return _serve(args, None)
    from moekit.parallel.inference import (
        INFERENCE_TIMEOUT,
        release_experts,
        serve_experts,
        split_model,
    )
    from moekit.parallel.mesh import close_parallel, init_parallel
    from moekit.runtime import resolve_device

    check_ep(args, "serve")
    parallel = init_parallel(args.ep, device=resolve_device(args.device), timeout=INFERENCE_TIMEOUT)
    try:
        if not parallel.is_main:  # serve this process's experts to the main one
            from moekit.model_dir import ModelDir

            model = ModelDir(args.model_dir).load_model(device=resolve_device(args.device))
            serve_experts(split_model(model.eval(), parallel), parallel)
            return 0
        try:
            return _serve(args, parallel)
        finally:
            release_experts(parallel)
    finally:
        close_parallel()


def _serve(args: argparse.Namespace, parallel: Any) -> int:
    from moekit.serve import PortInUseError, serve
    from moekit.serve.config import ConnectionLimits, SettingError

    api_key = args.api_key or os.environ.get("MOEKIT_API_KEY")
    base = f"http://{args.host}:{args.port}"

    def ready() -> None:
        page = f"{base}/?key=..." if api_key else f"{base}/"
        print(
            f"serving {args.model_dir} at {base}/v1 (OpenAI-compatible API) and {page} "
            "(playground); Ctrl-C stops, SIGTERM drains",
            file=sys.stderr,
        )

    try:
        limits = ConnectionLimits(
            header_timeout_s=args.header_timeout,
            body_timeout_s=args.body_timeout,
            max_connections=args.max_connections,
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
            device=args.device,
            offload=offload_config(args),
            on_ready=ready,
            limits=limits,
            allowed_hosts=split_list(args.allowed_hosts),
            allowed_origins=split_list(args.allowed_origins),
            prefill_chunk=args.prefill_chunk,
            shutdown_grace=args.shutdown_grace,
            parallel=parallel,
            tool_call_format=args.tool_call_format,
            prefix_cache_tokens=args.prefix_cache_tokens,
            speculative_tokens=_speculative_tokens(args),
            draft_dir=args.draft,
            compile=args.compile,
            on_progress=lambda message: print(message, file=sys.stderr),
        )
    except PortInUseError as e:
        raise ValueError(f"{e} (--port)") from None
    except SettingError as e:
        flag = FLAGS.get(e.setting)
        raise ValueError(f"{e} ({flag})" if flag else str(e)) from None
    return 0
