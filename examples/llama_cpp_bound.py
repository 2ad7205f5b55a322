"""Ours and llama.cpp's decoding against one memory-bandwidth bound, in one run.

    moekit convert --to-gguf MODEL_DIR --type f32 --out DIR   # the same weights as GGUF
    python examples/llama_cpp_bound.py LLAMA_CPP_BIN_DIR MODEL_DIR GGUF_FILE [--rounds 5]

`moekit bench generate` reports our decoding as a fraction of a bound: the bytes a decode step
reads (`moekit.speed.step_bytes`) over the memory bandwidth measured in the same run
(`moekit.speed.measure_bandwidth`). This puts llama.cpp under the same bound. Each round reads
the bandwidth, then times llama.cpp (`llama-bench -t 2 -p 0 -n N`, greedy decoding of N tokens
from an empty context, its fastest of three) and ours (the compiled decode step; N tokens after
a `--prompt-tokens` prompt, less the time of the first, as `bench generate` times it), in
turns. Prints each round, then each side's fastest decode as a fraction of the bound at the
highest bandwidth read (the bound `bench generate` uses) and, per round, of that round's read.
Not part of the test suite: it needs a llama.cpp build and a model large enough that its
weights do not fit in the CPU's caches (a float32 model of some hundreds of MB or more).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import time
from pathlib import Path

import torch

from moekit.infer.generate import Generator
from moekit.infer.sampling import SamplingParams
from moekit.speed import measure_bandwidth, step_bytes


def llama_cpp_decode(bin_dir: Path, gguf: Path, new_tokens: int, threads: int) -> float:
    """llama.cpp's decode tokens/s: the fastest of `llama-bench`'s three runs."""
    run = subprocess.run(
        [str(bin_dir / "llama-bench"), "-m", str(gguf), "-t", str(threads), "-p", "0",
         "-n", str(new_tokens), "-r", "3", "-o", "json"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    (result,) = json.loads(run.stdout)
    return float(max(result["samples_ts"]))


def our_decode(generator: Generator, prompt: list[int], new_tokens: int) -> float:
    """Our decode tokens/s: `new_tokens` after the prompt, less the time of the first."""

    def timed(n: int) -> float:
        params = SamplingParams(temperature=0, max_new_tokens=n, ignore_eos=True)
        start = time.perf_counter()
        generator.generate([prompt], params)
        return time.perf_counter() - start

    return (new_tokens - 1) / (timed(new_tokens) - timed(1))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("bin_dir", type=Path, help="llama.cpp's build/bin (with llama-bench)")
    p.add_argument("model_dir", help="the moekit model directory")
    p.add_argument("gguf", type=Path, help="the same weights as GGUF (moekit convert --to-gguf)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--prompt-tokens", type=int, default=32)
    a = p.parse_args()

    generator = Generator.from_dir(a.model_dir, compile=True)
    cfg = generator.model.cfg
    bpw = next(generator.model.parameters()).element_size()
    torch.manual_seed(0)
    prompt = torch.randint(2, cfg.vocab_size, (a.prompt_tokens,)).tolist()
    our_decode(generator, prompt, a.new_tokens)  # compiles the decode step (untimed)
    context = a.prompt_tokens + a.new_tokens // 2
    read = step_bytes(cfg, batch=1, context=context, bytes_per_weight=bpw).total
    print(f"{read / 2**20:.1f} MiB read per decoded token ({a.model_dir})")
    rounds = []
    for r in range(a.rounds):
        bandwidth = measure_bandwidth()
        theirs = llama_cpp_decode(a.bin_dir, a.gguf, a.new_tokens, torch.get_num_threads())
        ours = our_decode(generator, prompt, a.new_tokens)
        bound = bandwidth / read
        rounds.append((bandwidth, ours, theirs))
        print(
            f"round {r + 1}: bandwidth {bandwidth / 1e9:.1f} GB/s (bound {bound:.1f} tok/s); "
            f"ours {ours:.2f} tok/s ({ours / bound:.0%}), "
            f"llama.cpp {theirs:.2f} tok/s ({theirs / bound:.0%})"
        )
    bound = max(bw for bw, _, _ in rounds) / read
    for i, side in ((1, "ours"), (2, "llama.cpp")):
        best = max(row[i] for row in rounds)
        per_round = statistics.median(row[i] / (row[0] / read) for row in rounds)
        print(
            f"{side}: fastest {best:.2f} tok/s = {best / bound:.0%} of the bound at the highest "
            f"read ({bound:.1f} tok/s); median per round {per_round:.0%} of that round's read"
        )


if __name__ == "__main__":
    main()
