"""Before and after, in one process: another revision of the native kernels' source against the
package's, on the experts of eight MoE layers (or eight layers' dense projections).

    git show REV:src/moekit/moe/csrc/native.cpp > /tmp/before.cpp
    python examples/native_kernels_revision_ab.py /tmp/before.cpp [--float32 | --linear]

The given source is built under another operator namespace (PyTorch's extension builder, as
moekit.moe.native builds the package's), so both live in one process. By default the experts
are int4 with groups of 32 in `olmoe-1b-7b`'s shape (64 experts, top-8, dim 2048, hidden 1024,
random weights); `--float32` takes float32 experts of the 1.15B Mixtral-shaped model's shape
instead (8 experts, top-2, dim 1024, hidden 3584); `--linear` takes the dense `linear`
operator on float32 weights in that model's shapes (eight layers' attention projections, and
the head). For 1, 2, 4 and 8 tokens the two builds alternate (`--repeats`, default 10), each
keeping its fastest pass; prints both times, the stored bytes read per second (int4: the
packed values with their scales and minimums) and whether the two outputs are bit-for-bit
equal. Needs an AVX-512 CPU (where the kernels build) and, with `--float32`, about 3 GiB of
memory.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils.cpp_extension import load

from moekit.moe import native
from moekit.moe.experts import Experts
from moekit.quant.experts import QuantExperts

LAYERS = 8


def build(source: Path, name: str) -> object:
    """The operators of `source` under the namespace `name`."""
    text = source.read_text().replace(native.NAME, name)
    folder = Path(tempfile.mkdtemp(prefix=name))
    copy = folder / f"{name}.cpp"
    copy.write_text(text)
    load(name, [str(copy)], extra_cflags=native.FLAGS, extra_ldflags=["-fopenmp"],
         is_python_module=False)  # fmt: skip
    return getattr(torch.ops, name)


def experts(float32: bool) -> tuple[list[tuple[torch.Tensor, ...]], int, int, int, int]:
    """Each layer's stored tensors as the experts operator takes them, the bytes one expert's
    three projections store (int4: packed values, scales and minimums), and (experts, top-k,
    dim)."""
    num, k, dim, hidden = (8, 2, 1024, 3584) if float32 else (64, 8, 2048, 1024)
    layers: list[tuple[torch.Tensor, ...]] = []
    for _ in range(LAYERS):
        ex = Experts(num, dim, hidden)
        with torch.no_grad():
            for p in ex.parameters():
                p.normal_(0.0, 0.05)
        if float32:
            gate_up = ex.fused_gate_up()
            assert gate_up is not None
            layers.append((gate_up, ex.w_down))
        else:
            parts = QuantExperts.like(ex, 4, 32).native_parts(torch.zeros(1, dim))
            assert parts is not None
            layers.append(parts)
    per_expert = sum(t.numel() * t.element_size() for t in layers[0]) // num
    return layers, per_expert, num, k, dim


def linear_weights() -> list[torch.Tensor]:
    """Dense float32 weights in the 1.15B model's shapes: eight layers' fused q, k and v
    projection (1,536 x 1,024) and output projection (1,024 x 1,024), and the head (32,000 x
    1,024)."""
    shapes = [(1536, 1024), (1024, 1024)] * LAYERS + [(32000, 1024)]
    return [torch.randn(shape) * 0.05 for shape in shapes]


def workload(
    args: argparse.Namespace, tokens: int
) -> tuple[Callable[[Callable[..., torch.Tensor]], list[torch.Tensor]], int]:
    """For `tokens` tokens: a function running one build's operator over every weight, and
    the bytes that reads (experts: the distinct experts the tokens chose)."""
    if args.linear:
        ws, x = args.weights, torch.randn(tokens, 1024)
        return (lambda fn: [fn(x, w) for w in ws]), sum(w.numel() * 4 for w in ws)
    layers, per_expert, num, k, dim = args.weights
    x, weights = torch.randn(tokens, dim), torch.rand(tokens, k)
    chosen = [torch.stack([torch.randperm(num)[:k] for _ in range(tokens)]) for _ in layers]

    def run(fn: Callable[..., torch.Tensor]) -> list[torch.Tensor]:
        return [fn(x, e, weights, *p, False) for p, e in zip(layers, chosen, strict=True)]

    return run, sum(len(torch.unique(e)) for e in chosen) * per_expert


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("before", type=Path, help="the other revision's native.cpp")
    ap.add_argument("--repeats", type=int, default=10)
    kind = ap.add_mutually_exclusive_group()
    kind.add_argument("--float32", action="store_true")
    kind.add_argument("--linear", action="store_true")
    args = ap.parse_args()
    if not native.load():
        raise SystemExit("the native kernels are not available here (see the log above)")
    op = "linear" if args.linear else "grouped_swiglu" if args.float32 else "grouped_swiglu_int4"
    builds = {
        "before": getattr(build(args.before, "moekit_native_before"), op),
        "after": getattr(build(native.SOURCE, "moekit_native_after"), op),
    }
    torch.manual_seed(0)
    args.weights = linear_weights() if args.linear else experts(args.float32)
    with torch.inference_mode():
        for tokens in (1, 2, 4, 8):
            run, read = workload(args, tokens)
            outs = {name: run(fn) for name, fn in builds.items()}
            same = all(map(torch.equal, outs["before"], outs["after"]))
            best = dict.fromkeys(builds, float("inf"))
            for _ in range(args.repeats):
                for name, fn in builds.items():
                    start = time.perf_counter()
                    run(fn)
                    best[name] = min(best[name], time.perf_counter() - start)
            shown = ", ".join(
                f"{n} {s * 1e3:.1f} ms ({read / s / 1e9:.1f} GB/s)" for n, s in best.items()
            )
            print(f"{tokens} token(s): {shown}; {best['before'] / best['after']:.2f}x; "
                  f"bit-for-bit equal: {same}")  # fmt: skip


if __name__ == "__main__":
    main()
