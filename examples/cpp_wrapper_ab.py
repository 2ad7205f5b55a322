"""Before and after, in one process: the compiled decode step driven by inductor's Python
wrapper (before) against its C++ wrapper (after, the default; `MOEKIT_CPP_WRAPPER=0` turns it
off), on the same model, caches and token.

    python examples/cpp_wrapper_ab.py MODEL_DIR [--rounds 10]

Each variant is compiled once, then the rounds alternate between them, three steps each,
keeping each variant's fastest step. Prints both compile times, both step times, the gain and
the largest logit difference.
"""

from __future__ import annotations

import torch
from step_ab import Variant, arguments, model_of, report, time_steps

from moekit.infer.compiled import _native_weights
from moekit.moe import native


def main() -> None:
    args = arguments(__doc__, rounds=10).parse_args()
    model = model_of(args.model_dir)
    if _native_weights(model):
        native.load()

    def wrapper(cpp: bool) -> Variant:
        return Variant(
            compiler=lambda fn: torch.compile(fn, dynamic=False, options={"cpp_wrapper": cpp})
        )

    variants = {"before": wrapper(False), "after": wrapper(True)}
    report(time_steps(model, variants, rounds=args.rounds, steps=3), digits=2)


if __name__ == "__main__":
    main()
