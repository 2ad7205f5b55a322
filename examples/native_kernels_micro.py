"""The native decode kernels (moekit.moe.native) in isolation, against what they replace, in
one process with interleaved repeats (fastest of each):

- reads: the per-token matrices of a 1.15B Mixtral-shaped model (12 layers of attention and two
  3584 x 1024 experts, and a 32000 x 1024 head; 917 MiB) multiplied by one vector, one library
  (MKL) product per matrix against the native dense kernel per matrix, beside one 256 MiB
  library matrix-vector product (the reader of moekit.speed.measure_bandwidth);
- int4 experts: eight MoE layers of `olmoe-1b-7b`'s experts (top-8 of 64, dim 2048, hidden
  1024, groups of 32, random weights) for 1 and 4 tokens, the native int4 kernel against the
  compiled `int4_product` loop (moekit.moe.decode_kernel.swiglu_sum under torch.compile).

    python examples/native_kernels_micro.py [--repeats 6]

Needs an AVX-512 CPU (where the kernels build) and about 3 GiB of memory.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

from moekit.moe import native
from moekit.moe.decode_kernel import swiglu_sum
from moekit.moe.experts import Experts
from moekit.quant.experts import QuantExperts


def fastest(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def reads(repeats: int) -> None:
    shapes = [(1024, 1024), (256, 1024), (256, 1024), (1024, 1024), (7168, 1024), (7168, 1024)]
    mats = [torch.randn(*s) for _ in range(12) for s in shapes] + [torch.randn(32000, 1024)]
    x = torch.randn(1, 1024)
    big = torch.randn(64 << 20).view(-1, 1024)  # 256 MiB
    nbytes = sum(m.numel() * 4 for m in mats)
    fns = {
        "one 256 MiB library mat-vec": lambda: torch.mv(big, x[0]),
        "library product per matrix": lambda: [torch.nn.functional.linear(x, m) for m in mats],
        "native product per matrix": lambda: [native.linear(x, m) for m in mats],
    }
    sizes = {name: nbytes for name in fns} | {"one 256 MiB library mat-vec": big.numel() * 4}
    for name, seconds in fastest(fns, repeats).items():
        print(f"  {name:30s} {sizes[name] / seconds / 1e9:5.1f} GB/s")


def int4_experts(repeats: int) -> None:
    layers = []
    for _ in range(8):
        ex = Experts(64, 2048, 1024)
        with torch.no_grad():
            for p in ex.parameters():
                p.normal_(0.0, 0.05)
        layers.append(QuantExperts.like(ex, 4, 32))
    compiled = torch.compile(swiglu_sum, dynamic=False, fullgraph=True)
    for tokens in (1, 4):
        x, weights = torch.randn(tokens, 2048), torch.rand(tokens, 8)
        chosen = [torch.stack([torch.randperm(64)[:8] for _ in range(tokens)]) for _ in layers]

        def run_native(x=x, weights=weights, chosen=chosen) -> None:
            for q, e in zip(layers, chosen, strict=True):
                parts = q.native_parts(x)
                assert parts is not None
                native.grouped_swiglu_int4(x, e, weights, *parts, scale_input=False)

        def run_compiled(x=x, weights=weights, chosen=chosen) -> None:
            for q, e in zip(layers, chosen, strict=True):
                product, gate, up, down = q.token_math()
                compiled(x, e, weights, gate, up, down, product)

        run_compiled()  # compiles
        best = fastest({"native": run_native, "compiled": run_compiled}, repeats)
        ours, loop = best["native"], best["compiled"]
        print(f"  {tokens} token(s): native {ours * 1e3:.1f} ms, "
              f"compiled loop {loop * 1e3:.1f} ms, {loop / ours:.2f}x")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=6)
    args = ap.parse_args()
    if not native.load():
        raise SystemExit("the native kernels are not available here (see the log above)")
    with torch.inference_mode():
        print("reads of a 1.15B model's per-token matrices (917 MiB):")
        reads(args.repeats)
        print("int4 experts, 8 layers of olmoe-1b-7b's shape:")
        int4_experts(args.repeats)


if __name__ == "__main__":
    main()
