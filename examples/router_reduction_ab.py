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

import argparse
import time

import torch
import torch.nn.functional as F

import moekit.moe.router as router
from moekit.infer.compiled import CompiledDecoder, _native_weights
from moekit.model_dir import load_model
from moekit.moe import native
from moekit.nn.kv_cache import KVCache


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model_dir")
    ap.add_argument("--rounds", type=int, default=20)
    args = ap.parse_args()
    model = load_model(args.model_dir).eval()
    if _native_weights(model):
        native.load()
    variants = {"before": F.linear, "after": router._project}
    token, live = torch.tensor([[5]]), torch.ones(1, 1, dtype=torch.bool)
    decoders, caches, logits = {}, {}, {}
    with torch.inference_mode():
        for name, project in variants.items():
            router._project = project  # type: ignore[assignment]
            decoders[name] = CompiledDecoder(model)
            length = 1 + 5 * args.rounds  # every step of the run
            caches[name] = KVCache(model.cfg, 1, length, device=torch.device("cpu"))
            start = time.perf_counter()
            logits[name] = decoders[name].step(token, caches[name], live, None)
            print(f"{name}: compiled in {time.perf_counter() - start:.1f} s", flush=True)
        best = dict.fromkeys(decoders, float("inf"))
        for _ in range(args.rounds):
            for name, decoder in decoders.items():
                router._project = variants[name]  # type: ignore[assignment]
                for _ in range(5):
                    start = time.perf_counter()
                    decoder.step(token, caches[name], live, None)
                    best[name] = min(best[name], time.perf_counter() - start)
    router._project = variants["after"]  # type: ignore[assignment]
    diff = (logits["before"] - logits["after"]).abs().max().item()
    for name, seconds in best.items():
        print(f"{name}: fastest step {seconds * 1e3:.3f} ms")
    print(f"gain {best['before'] / best['after']:.3f}x; largest logit difference {diff:.1e}")


if __name__ == "__main__":
    main()
