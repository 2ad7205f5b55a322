"""Before and after, in one process: the compiled decode step with every weight a generated
reduction (before) against the step that leaves weights of `LIBRARY_MIN_ELEMENTS` or more to
the library's products (after), on the same model, cache and token.

    python examples/library_products_ab.py MODEL_DIR [--rounds 8]

Each variant is compiled once (the size rule is read while tracing, so the two graphs differ),
then the rounds alternate between them, two steps each, keeping each variant's fastest step.
Prints both step times, the gain, the largest logit difference between the two and the
memory bandwidth measured between the rounds (moekit.speed.measure_bandwidth). On a CPU
without AVX-512 both variants are the reductions (moekit.moe.decode_kernel.LIBRARY_CPU).
"""

from __future__ import annotations

from step_ab import Variant, arguments, model_of, report, time_steps

import moekit.moe.decode_kernel as dk


def main() -> None:
    args = arguments(__doc__, rounds=8).parse_args()
    model = model_of(args.model_dir)

    def threshold(elements: int) -> Variant:
        return Variant(select=lambda: setattr(dk, "LIBRARY_MIN_ELEMENTS", elements))

    variants = {"before": threshold(1 << 62), "after": threshold(dk.LIBRARY_MIN_ELEMENTS)}
    steps = time_steps(model, variants, rounds=args.rounds, steps=2, read_bandwidth=True)
    report(steps, digits=1)


if __name__ == "__main__":
    main()
