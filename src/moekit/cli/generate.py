"""`moekit generate`: continue a prompt, streaming to the terminal (or one JSON object)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from moekit.cli.common import (
    add_compile_argument,
    add_device_argument,
    add_ep_argument,
    add_offload_arguments,
    add_sampling_arguments,
    add_speculative_arguments,
    check_ep,
    doc,
    offload_config,
    sampling_params,
    speculative_config,
)
from moekit.cli.format import print_json


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "generate",
        help="continue a prompt with a trained model (streams to the terminal)",
        description=doc("moekit.infer.generate", "Generator"),
    )
    p.add_argument("model_dir")
    p.add_argument("prompt")
    add_sampling_arguments(p, default_temperature=0.8)
    add_device_argument(p)
    add_offload_arguments(p)
    add_compile_argument(p)
    add_ep_argument(p, "generate")
    add_speculative_arguments(p)
    p.add_argument("--routing", action="store_true", help="with --json: each token's experts")
    p.add_argument(
        "--json", action="store_true", help="print {text, token_ids, ...} instead of streaming"
    )
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from moekit.infer.generate import Generator

    if args.ep is not None:
        check_ep(args, "generate")  # before loading anything
    speculative = speculative_config(args)
    if speculative is not None and args.routing:
        raise ValueError("--routing is not available with --speculative")
    generator = Generator.from_dir(
        args.model_dir, device=args.device, offload=offload_config(args), compile=args.compile
    )
    if speculative is not None:
        from moekit.infer.speculative import Speculator

        generator.speculative = Speculator(generator, speculative)
    if args.ep is None:
        return _generate(generator, args)
    from moekit.parallel.inference import (
        INFERENCE_TIMEOUT,
        release_experts,
        serve_experts,
        split_model,
    )
    from moekit.parallel.mesh import close_parallel, init_parallel

    parallel = init_parallel(args.ep, device=generator.device, timeout=INFERENCE_TIMEOUT)
    try:
        split_model(generator.model, parallel)
        if not parallel.is_main:
            serve_experts(generator.model, parallel)  # until the main process is done
            return 0
        try:
            return _generate(generator, args)
        finally:
            release_experts(parallel)
    finally:
        close_parallel()


def _generate(generator: Any, args: argparse.Namespace) -> int:
    params = sampling_params(args, generator.defaults.sampling(), return_routing=args.routing)
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
        from moekit.infer.offload import offload_report

        if (offload := offload_report(generator.model)) is not None:
            data["offload"] = offload
        print_json(data)
        return 0
    sys.stdout.write(args.prompt)
    for chunk in generator.stream(args.prompt, params):
        sys.stdout.write(chunk.text)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0
