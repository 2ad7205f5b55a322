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

import argparse
import time

import torch

from moekit.infer.compiled import CompiledDecoder
from moekit.model_dir import load_model
from moekit.moe import native
from moekit.nn.kv_cache import KVCache
from moekit.speed import measure_bandwidth, step_bytes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model_dir")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--batch", type=int, default=1)
    args = ap.parse_args()
    if not native.load():
        raise SystemExit("the native kernels are not available here (see the log above)")
    model = load_model(args.model_dir).eval()
    variants = {"before": False, "after": True}  # the kernels loaded, as the step sees it
    token = torch.arange(5, 5 + args.batch).view(-1, 1)  # a different token per row
    live = torch.ones(args.batch, 1, dtype=torch.bool)
    decoders, caches, logits = {}, {}, {}
    with torch.inference_mode():
        for name, loaded in variants.items():
            native._loaded = loaded
            decoders[name] = CompiledDecoder(model)
            caches[name] = KVCache(model.cfg, args.batch, 256, device=torch.device("cpu"))
            start = time.perf_counter()
            logits[name] = decoders[name].step(token, caches[name], live, None)
            print(f"{name}: compiled in {time.perf_counter() - start:.1f} s", flush=True)
        best = dict.fromkeys(variants, float("inf"))
        bandwidth = 0.0
        for _ in range(args.rounds):
            bandwidth = max(bandwidth, measure_bandwidth())
            for name, loaded in variants.items():
                native._loaded = loaded  # the guard picks that variant's graph
                for _ in range(2):
                    start = time.perf_counter()
                    decoders[name].step(token, caches[name], live, None)
                    best[name] = min(best[name], time.perf_counter() - start)
    native._loaded = True
    diff = (logits["before"] - logits["after"]).abs().max().item()
    context = caches["after"].max_len
    nbytes = step_bytes(model.cfg, batch=args.batch, context=context).total
    for name, seconds in best.items():
        bound = f" ({nbytes / bandwidth / seconds:.0%} of the bound)" if args.batch == 1 else ""
        print(f"{name}: fastest step {seconds * 1e3:.1f} ms{bound}")
    print(f"gain {best['before'] / best['after']:.3f}x; largest logit difference {diff:.1e}; "
          f"bandwidth (fastest read) {bandwidth / 1e9:.1f} GB/s")  # fmt: skip


if __name__ == "__main__":
    main()
