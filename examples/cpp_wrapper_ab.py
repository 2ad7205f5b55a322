"""Before and after, in one process: the compiled decode step driven by inductor's Python
wrapper (before) against its C++ wrapper (after, the default; `MOEKIT_CPP_WRAPPER=0` turns it
off), on the same model, caches and token.

    python examples/cpp_wrapper_ab.py MODEL_DIR [--rounds 10]

Each variant is compiled once, then the rounds alternate between them, three steps each,
keeping each variant's fastest step. Prints both compile times, both step times, the gain and
the largest logit difference.
"""

from __future__ import annotations

import argparse
import time

import torch

from moekit.infer.compiled import CompiledDecoder, _native_weights
from moekit.model_dir import load_model
from moekit.moe import native
from moekit.nn.kv_cache import KVCache


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model_dir")
    ap.add_argument("--rounds", type=int, default=10)
    args = ap.parse_args()
    model = load_model(args.model_dir).eval()
    if _native_weights(model):
        native.load()
    token, live = torch.tensor([[5]]), torch.ones(1, 1, dtype=torch.bool)
    decoders, caches, logits = {}, {}, {}
    with torch.inference_mode():
        for name, cpp in (("before", False), ("after", True)):

            def compiler(fn, cpp=cpp):
                return torch.compile(fn, dynamic=False, options={"cpp_wrapper": cpp})

            decoders[name] = CompiledDecoder(model, compiler=compiler)
            caches[name] = KVCache(model.cfg, 1, 256, device=torch.device("cpu"))
            start = time.perf_counter()
            logits[name] = decoders[name].step(token, caches[name], live, None)
            print(f"{name}: compiled in {time.perf_counter() - start:.1f} s", flush=True)
        best = dict.fromkeys(decoders, float("inf"))
        for _ in range(args.rounds):
            for name, decoder in decoders.items():
                for _ in range(3):
                    start = time.perf_counter()
                    decoder.step(token, caches[name], live, None)
                    best[name] = min(best[name], time.perf_counter() - start)
    diff = (logits["before"] - logits["after"]).abs().max().item()
    for name, seconds in best.items():
        print(f"{name}: fastest step {seconds * 1e3:.2f} ms")
    print(f"gain {best['before'] / best['after']:.3f}x; largest logit difference {diff:.1e}")


if __name__ == "__main__":
    main()
