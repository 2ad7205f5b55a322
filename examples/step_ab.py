"""What the same-process A/B scripts of the compiled decode step share (`cpp_wrapper_ab.py`,
`router_reduction_ab.py`, `library_products_ab.py`, `native_kernels_ab.py`): compile each
variant of the step on the same model, alternate rounds between them, keep each one's fastest
step, and print the comparison. Not a command itself.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from moekit.infer.compiled import CompiledDecoder
from moekit.model import Transformer
from moekit.model_dir import load_model
from moekit.nn.kv_cache import KVCache
from moekit.speed import measure_bandwidth


@dataclass
class Variant:
    """One side of a comparison: `select` makes it the one the step sees (it runs before the
    variant is compiled and before each of its rounds: the step's guards then pick that
    variant's graph); `compiler` is the decoder's compiler (None: CompiledDecoder's own)."""

    select: Callable[[], object] = lambda: None
    compiler: Callable[..., Callable[..., object]] | None = None


@dataclass
class Steps:
    """Each variant's fastest step in seconds, its first logits, its cache, and the fastest
    bandwidth read between rounds (0 where none was read)."""

    best: dict[str, float] = field(default_factory=dict)
    logits: dict[str, torch.Tensor] = field(default_factory=dict)
    caches: dict[str, KVCache] = field(default_factory=dict)
    bandwidth: float = 0.0


def arguments(doc: str, rounds: int) -> argparse.ArgumentParser:
    """The scripts' common arguments: MODEL_DIR and --rounds (default `rounds`)."""
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    ap.add_argument("model_dir")
    ap.add_argument("--rounds", type=int, default=rounds)
    return ap


def model_of(model_dir: str) -> Transformer:
    return load_model(model_dir).eval()


def time_steps(
    model: Transformer,
    variants: dict[str, Variant],
    *,
    rounds: int,
    steps: int,
    batch: int = 1,
    cache_len: int = 256,
    read_bandwidth: bool = False,
) -> Steps:
    """Compile every variant (printing how long each took), then `rounds` rounds of `steps`
    steps of each in turn, a different token per row; with `read_bandwidth`, the memory
    bandwidth is read at the start of every round."""
    token = torch.arange(5, 5 + batch).view(-1, 1)
    live = torch.ones(batch, 1, dtype=torch.bool)
    out, decoders = Steps(), {}
    with torch.inference_mode():
        for name, variant in variants.items():
            variant.select()
            kwargs = {} if variant.compiler is None else {"compiler": variant.compiler}
            decoders[name] = CompiledDecoder(model, **kwargs)
            out.caches[name] = KVCache(model.cfg, batch, cache_len, device=torch.device("cpu"))
            start = time.perf_counter()
            logits = decoders[name].step(token, out.caches[name], live, None)
            if logits is None:
                raise SystemExit(
                    f"the compiled step does not cover this model: {decoders[name].reason}"
                )
            out.logits[name] = logits
            print(f"{name}: compiled in {time.perf_counter() - start:.1f} s", flush=True)
        out.best = dict.fromkeys(variants, float("inf"))
        for _ in range(rounds):
            if read_bandwidth:
                out.bandwidth = max(out.bandwidth, measure_bandwidth())
            for name, variant in variants.items():
                variant.select()
                for _ in range(steps):
                    start = time.perf_counter()
                    decoders[name].step(token, out.caches[name], live, None)
                    out.best[name] = min(out.best[name], time.perf_counter() - start)
    return out


def report(steps: Steps, digits: int, notes: dict[str, str] | None = None) -> None:
    """Print each variant's fastest step (in ms, `digits` decimals, with its note if any), the
    gain of the second over the first, their largest logit difference and the bandwidth."""
    (before, first), (after, second) = steps.logits.items()
    for name, seconds in steps.best.items():
        print(f"{name}: fastest step {seconds * 1e3:.{digits}f} ms{(notes or {}).get(name, '')}")
    line = f"gain {steps.best[before] / steps.best[after]:.3f}x"
    line += f"; largest logit difference {(first - second).abs().max().item():.1e}"
    if steps.bandwidth:
        line += f"; bandwidth (fastest read) {steps.bandwidth / 1e9:.1f} GB/s"
    print(line)
