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

import argparse
import time

import torch

import moekit.moe.decode_kernel as dk
from moekit.infer.compiled import CompiledDecoder
from moekit.model_dir import load_model
from moekit.nn.kv_cache import KVCache
from moekit.speed import measure_bandwidth


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model_dir")
    ap.add_argument("--rounds", type=int, default=8)
    args = ap.parse_args()
    model = load_model(args.model_dir).eval()
    thresholds = {"before": 1 << 62, "after": dk.LIBRARY_MIN_ELEMENTS}
    token, live = torch.tensor([[5]]), torch.ones(1, 1, dtype=torch.bool)
    decoders, caches, logits = {}, {}, {}
    with torch.inference_mode():
        for name, threshold in thresholds.items():
            dk.LIBRARY_MIN_ELEMENTS = threshold
            decoders[name] = CompiledDecoder(model)
            caches[name] = KVCache(model.cfg, 1, 256, device=torch.device("cpu"))
            start = time.perf_counter()
            logits[name] = decoders[name].step(token, caches[name], live, None)
            print(f"{name}: compiled in {time.perf_counter() - start:.1f} s", flush=True)
        best = dict.fromkeys(thresholds, float("inf"))
        bandwidth = 0.0
        for _ in range(args.rounds):
            bandwidth = max(bandwidth, measure_bandwidth())
            for name, threshold in thresholds.items():
                dk.LIBRARY_MIN_ELEMENTS = threshold  # the guard picks that variant's graph
                for _ in range(2):
                    start = time.perf_counter()
                    decoders[name].step(token, caches[name], live, None)
                    best[name] = min(best[name], time.perf_counter() - start)
    diff = (logits["before"] - logits["after"]).abs().max().item()
    for name, seconds in best.items():
        print(f"{name}: fastest step {seconds * 1e3:.1f} ms")
    print(f"gain {best['before'] / best['after']:.3f}x; largest logit difference {diff:.1e}; "
          f"bandwidth (fastest read) {bandwidth / 1e9:.1f} GB/s")  # fmt: skip


if __name__ == "__main__":
    main()
