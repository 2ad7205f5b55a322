"""Before and after, in one process: the compiled decode step with large float32 weights read
by the library's products (before) against the native streaming kernels of
`moekit.moe.native` (after), on the same model, caches and tokens.

    python examples/native_kernels_ab.py MODEL_DIR [--rounds 6] [--batch 1]

Each variant is compiled once (whether the kernels are loaded is read while tracing, so the
two graphs differ), then the rounds alternate between them, two steps each, keeping each
variant's fastest step. Prints both step times, the gain, the largest logit difference, the
memory bandwidth measured between the rounds (moekit.speed.measure_bandwidth) and, at batch
1, each step as a fraction of the bandwidth bound (the bytes the step reads,
moekit.speed.step_bytes, at that bandwidth; at larger batches the experts read depend on the
routing of the rows' tokens). Needs an AVX-512 CPU, where the kernels build.
"""

from __future__ import annotations

from step_ab import Variant, arguments, model_of, report, time_steps

from moekit.moe import native
from moekit.speed import step_bytes


def main() -> None:
    ap = arguments(__doc__, rounds=6)
    ap.add_argument("--batch", type=int, default=1)
    args = ap.parse_args()
    if not native.load():
        raise SystemExit("the native kernels are not available here (see the log above)")
    model = model_of(args.model_dir)

    def kernels(loaded: bool) -> Variant:  # the kernels loaded, as the step sees it
        return Variant(select=lambda: setattr(native, "_loaded", loaded))

    variants = {"before": kernels(False), "after": kernels(True)}
    steps = time_steps(
        model, variants, rounds=args.rounds, steps=2, batch=args.batch, read_bandwidth=True
    )
    notes = {}
    if args.batch == 1:  # at larger batches the experts read depend on the rows' routing
        context = steps.caches["after"].max_len
        nbytes = step_bytes(model.cfg, batch=1, context=context).total
        notes = {
            name: f" ({nbytes / steps.bandwidth / seconds:.0%} of the bound)"
            for name, seconds in steps.best.items()
        }
    report(steps, digits=1, notes=notes)


if __name__ == "__main__":
    main()
