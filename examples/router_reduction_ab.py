"""Before and after, in one process: the compiled decode step with the router's logits as the
library's matrix product (before) against a reduction over the router's rows that the compiler
fuses with the softmax and top-k around it (after, the default; `moekit.moe.router._project`),
on the same model, caches and token.

    python examples/router_reduction_ab.py MODEL_DIR [--rounds 20]

Each variant is compiled once (the router's projection is a global the step's guards check,
so swapping it selects that variant's graph), then the rounds alternate between them, five
steps each, keeping each variant's fastest step. Prints both step times, the gain and the
largest logit difference.
"""

from __future__ import annotations

import torch.nn.functional as F
from step_ab import Variant, arguments, model_of, report, time_steps

import moekit.moe.router as router
from moekit.infer.compiled import _native_weights
from moekit.moe import native


def main() -> None:
    args = arguments(__doc__, rounds=20).parse_args()
    model = model_of(args.model_dir)
    if _native_weights(model):
        native.load()

    def projection(project: object) -> Variant:
        return Variant(select=lambda: setattr(router, "_project", project))

    variants = {"before": projection(F.linear), "after": projection(router._project)}
    steps = time_steps(
        model, variants, rounds=args.rounds, steps=5, cache_len=1 + 5 * args.rounds
    )  # a cache as long as the run's steps
    report(steps, digits=3)


if __name__ == "__main__":
    main()
