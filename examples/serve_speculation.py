"""Decode speed of the serving engine with and without prompt-lookup speculation
(`moekit serve --speculative ngram`), on the same model, prompts and greedy settings, the two
engines taking turns; prints tokens/s of each, their ratio and the share of drafts kept.

    python examples/serve_speculation.py MODEL_DIR [--num-draft-tokens 4] [--rounds 3]
"""

from __future__ import annotations

import argparse
import threading
import time

from moekit.infer.generate import Generator
from moekit.infer.sampling import SamplingParams
from moekit.serve.engine import DoneEvent, Engine, EngineRequest

PROMPTS = [
    "def add(a, b):\n    return a + b\n\n\ndef sub(a, b):\n    return a - b\n\n\ndef mul(a, b):\n",
    "The cat sat on the mat. The dog sat on the log. The cat",
    "import os\nimport sys\nimport json\n\n\ndef main():\n",
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
    parser.add_argument("--batch", type=int, default=1, help="requests at once (1 to 3)")
    args = parser.parse_args()
    generator = Generator.from_dir(args.model_dir, device="cpu")
    engines = {k: Engine(generator, max_batch=4, speculative_tokens=k)
               for k in (0, args.num_draft_tokens)}  # fmt: skip
    for engine in engines.values():
        engine.start()
    seconds = dict.fromkeys(engines, 0.0)
    tokens = dict.fromkeys(engines, 0)
    prompts = PROMPTS[: args.batch]
    timed(engines[0], generator, 8, prompts)  # warm-up
    for _ in range(args.rounds):
        for k, engine in engines.items():
            s, n = timed(engine, generator, args.new_tokens, prompts)
            seconds[k] += s
            tokens[k] += n
    for engine in engines.values():
        engine.stop()
    plain, spec = (tokens[k] / seconds[k] for k in engines)
    stats = engines[args.num_draft_tokens].stats
    kept = stats.accepted_tokens / max(stats.drafted_tokens, 1)
    per_pass = stats.generated_tokens / max(stats.decode_steps, 1) / len(prompts)
    print(
        f"plain {plain:.1f} tok/s, speculative (k={args.num_draft_tokens}) {spec:.1f} tok/s: "
        f"{spec / plain:.2f}x; drafts kept {kept:.0%}, tokens per pass and request "
        f"{per_pass:.2f} (batch of {len(prompts)})"
    )


if __name__ == "__main__":
    main()
