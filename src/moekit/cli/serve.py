"""`moekit serve`: an OpenAI-compatible HTTP API and a playground page."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from moekit.cli.common import add_device_argument, doc


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
    p.add_argument(
        "--prefill-chunk",
        type=int,
        default=512,
        help="prompt tokens prefilled between two decode steps of the running requests, so a "
        "long prompt does not stall them (0: whole prompts at once; default 512)",
    )
    p.add_argument(
        "--shutdown-grace",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="on SIGTERM, refuse new requests and let running ones finish for up to this "
        "long, then abort the rest (default 30; a second SIGTERM or Ctrl-C stops at once)",
    )
    p.set_defaults(run=run, json=False)


def run(args: argparse.Namespace) -> int:
    from moekit.serve import PortInUseError, serve

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
            on_ready=ready,
            prefill_chunk=args.prefill_chunk,
            shutdown_grace=args.shutdown_grace,
        )
    except PortInUseError as e:
        raise ValueError(f"{e} (--port)") from None
    return 0
