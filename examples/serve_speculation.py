"""Decode speed of the serving engine with and without speculation, by prompt lookup
(`moekit serve --speculative ngram`) or, with --draft, by a draft model (`--speculative draft
--draft DRAFT_DIR`), on the same model, prompts and greedy settings, the two engines taking
turns; prints tokens/s of each, their ratio and the share of drafts kept.

    python examples/serve_speculation.py MODEL_DIR [--draft DRAFT_DIR] [--num-draft-tokens 4]
        [--batch 1] [--rounds 3]
"""

from __future__ import annotations

import argparse
import threading
import time

from moekit.infer.generate import Generator
from moekit.infer.sampling import SamplingParams
from moekit.serve.draft import load_drafter
from moekit.serve.engine import DoneEvent, Engine, EngineRequest

PROMPTS = [
    "def add(a, b):\n    return a + b\n\n\ndef sub(a, b):\n    return a - b\n\n\ndef mul(a, b):\n",
    "The cat sat on the mat. The dog sat on the log. The cat",
    "import os\nimport sys\nimport json\n\n\ndef main():\n",
    "Mixture-of-experts models route each token to a few of their experts. The router",
]


def timed(
    engine: Engine, generator: Generator, new_tokens: int, prompts: list[str]
) -> tuple[float, int]:
    """Seconds for every prompt's greedy answer, submitted together, and the tokens made."""
    done = threading.Semaphore(0)
    counts = []

    def emit(event: object) -> None:
        if isinstance(event, DoneEvent):
            counts.append(event.completion_tokens)
            done.release()

    params = SamplingParams(temperature=0, max_new_tokens=new_tokens, ignore_eos=True)
    reqs = [EngineRequest(generator.tokenizer.encode_prompt(p), params, emit) for p in prompts]
    start = time.perf_counter()
    engine.submit(*reqs)
    for _ in reqs:
        done.acquire()
    return time.perf_counter() - start, sum(counts)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model_dir")
    parser.add_argument("--num-draft-tokens", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch", type=int, default=1, help="requests at once (1 to 4)")
    parser.add_argument("--draft", help="a draft model directory (default: prompt lookup)")
    args = parser.parse_args()
    generator = Generator.from_dir(args.model_dir, device="cpu")
    engines = {k: Engine(generator, max_batch=4, speculative_tokens=k)
               for k in (0, args.num_draft_tokens)}  # fmt: skip
    if args.draft:
        engines[args.num_draft_tokens].drafter = load_drafter(
            args.draft, engines[args.num_draft_tokens]
        )
    for engine in engines.values():
        engine.start()
    seconds = dict.fromkeys(engines, 0.0)
    tokens = dict.fromkeys(engines, 0)
    prompts = PROMPTS[: args.batch]
    for engine in engines.values():  # warm-up: the one-row decode kernels compile once
        timed(engine, generator, 8, prompts[:1])
        timed(engine, generator, 8, prompts)
    spec_stats = engines[args.num_draft_tokens].stats
    names = ("accepted_tokens", "drafted_tokens", "generated_tokens", "decode_steps")
    warm = {name: getattr(spec_stats, name) for name in names}
    for _ in range(args.rounds):
        for k, engine in engines.items():
            s, n = timed(engine, generator, args.new_tokens, prompts)
            seconds[k] += s
            tokens[k] += n
    for engine in engines.values():
        engine.stop()
    plain, spec = (tokens[k] / seconds[k] for k in engines)
    run = {name: getattr(spec_stats, name) - warm[name] for name in names}  # after the warm-up
    kept = run["accepted_tokens"] / max(run["drafted_tokens"], 1)
    per_pass = run["generated_tokens"] / max(run["decode_steps"], 1) / len(prompts)
    method = "draft model" if args.draft else "prompt lookup"
    print(
        f"plain {plain:.1f} tok/s, {method} (k={args.num_draft_tokens}) {spec:.1f} tok/s: "
        f"{spec / plain:.2f}x; drafts kept {kept:.0%}, tokens per pass and request "
        f"{per_pass:.2f} (batch of {len(prompts)})"
    )


if __name__ == "__main__":
    main()
