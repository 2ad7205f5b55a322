"""What routing replay costs the serving engine: decode throughput of plain requests, requests
that record their routing (`return_routed_experts`) and requests that replay a recorded one
(`routed_experts`), measured in one process, in interleaved rounds, as ratios to plain.

    python examples/routing_replay_cost.py MODEL_DIR [--batch 8] [--tokens 64] [--rounds 3]

Each round submits `--batch` requests of `--tokens` greedy tokens of each kind to one engine
(continuous batching, as `moekit serve` runs them) and times them until all are done. It also
prints the size of a recorded routing in its JSON form. Not part of the test suite.
"""

from __future__ import annotations

import argparse
import json
import threading
import time

import torch

from moekit.infer.generate import Generator
from moekit.infer.routing_replay import decode_routing
from moekit.infer.sampling import SamplingParams
from moekit.serve.engine import DoneEvent, Engine, EngineRequest

PROMPT = "The history of the river and the city that grew beside it"


def run(
    engine: Engine, prompt: list[int], kind: str, batch: int, tokens: int, forced
) -> tuple[float, list]:
    """Seconds for `batch` requests of one kind, and their DoneEvents."""
    done: list[DoneEvent] = []
    finished = threading.Event()

    def emit(event) -> None:
        if isinstance(event, DoneEvent):
            done.append(event)
            if len(done) == batch:
                finished.set()

    params = SamplingParams(max_new_tokens=tokens, temperature=0.0, ignore_eos=True)
    reqs = []
    for _ in range(batch):
        req = EngineRequest(list(prompt), params, emit)
        req.return_routed_experts = kind == "record"
        req.routed_experts = forced if kind == "replay" else None
        reqs.append(req)
    t0 = time.perf_counter()
    engine.submit(*reqs)
    finished.wait()
    return time.perf_counter() - t0, done


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model_dir")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    torch.manual_seed(0)
    gen = Generator.from_dir(args.model_dir)
    engine = Engine(gen, max_batch=args.batch, max_queue=4 * args.batch)
    engine.start()
    cfg = gen.model.cfg
    assert cfg.moe is not None, "routing replay needs an MoE model"
    prompt = gen.tokenizer.encode_prompt(PROMPT)
    _, recorded = run(engine, prompt, "record", 1, args.tokens, None)  # also warms up
    routing = recorded[0].routed_experts
    forced = decode_routing(routing, num_experts=cfg.moe.num_experts)
    times: dict[str, list[float]] = {"plain": [], "record": [], "replay": []}
    for _ in range(args.rounds):
        for kind in times:
            seconds, _ = run(engine, prompt, kind, args.batch, args.tokens, forced)
            times[kind].append(seconds)
    engine.stop()
    best = {k: min(v) for k, v in times.items()}
    generated = args.batch * args.tokens
    print(f"model {args.model_dir}: {len(cfg.moe_layers)} MoE layers, {cfg.moe.num_experts} "
          f"experts, top-{cfg.moe.top_k}; {args.batch} requests x {args.tokens} tokens, "
          f"best of {args.rounds} interleaved rounds")  # fmt: skip
    for kind, seconds in times.items():
        print(f"  {kind:7s} rounds: " + " ".join(f"{generated / t:.1f}" for t in seconds))
    for kind, seconds in best.items():
        print(f"  {kind:7s} {generated / seconds:8.1f} tokens/s   x{best['plain'] / seconds:.3f} "
              "of plain")  # fmt: skip
    rows = routing["shape"][0]
    print(f"  a recorded routing of {rows} tokens: {len(json.dumps(routing))} bytes of JSON")


if __name__ == "__main__":
    main()
