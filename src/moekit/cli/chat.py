"""`moekit chat`: an interactive conversation with a model in the terminal."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from moekit.cli.common import (
    add_compile_argument,
    add_device_argument,
    add_offload_arguments,
    add_sampling_arguments,
    doc,
    offload_config,
    sampling_params,
)


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "chat",
        help="an interactive chat with a model in the terminal",
        description=doc("moekit.infer.chat", "ChatSession"),
    )
    p.add_argument("model_dir")
    p.add_argument("--system", help="a system message")
    add_sampling_arguments(p, default_temperature=0.7)
    add_device_argument(p)
    add_offload_arguments(p)
    add_compile_argument(p)
    p.set_defaults(run=run, json=False)


def run(args: argparse.Namespace) -> int:
    from moekit.infer.chat import ChatSession
    from moekit.infer.generate import ContextLengthError, Generator
    from moekit.infer.jinja_chat import load_chat_template

    template = load_chat_template(args.model_dir)
    generator = Generator.from_dir(
        args.model_dir, device=args.device, offload=offload_config(args), compile=args.compile
    )
    session = ChatSession(
        generator,
        sampling_params(args, generator.defaults.sampling()),
        template=template,
        system=args.system,
    )
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
            session.reset()
            continue
        if not line.strip():
            continue
        sys.stdout.write("model> ")
        try:
            for piece in session.send(line):
                sys.stdout.write(piece)
                sys.stdout.flush()
        except ContextLengthError:
            print("\n(the message is too long for the model's context)", file=sys.stderr)
        sys.stdout.write("\n")
