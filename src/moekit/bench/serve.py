"""`moekit bench serve`: aggregate decode throughput of the server with 1 and with N concurrent
clients, measured in one run against a real server on loopback, and what hostile clients do
to them.

Each client sends back-to-back completion requests of `new_tokens` tokens (end-of-text
ignored, so every request generates exactly that many) for `seconds`; throughput is the
generated tokens over the wall-clock time, and each request's latency is recorded (p50, p99)
along with the requests that failed. Dynamic batching should make N clients' aggregate far
higher than one client's. While the N clients run, a slowloris and an oversized-request client
(`moekit.bench.hostile`) run beside them unless `hostile=False`, and the process's peak memory
is sampled: the well-formed clients should see no error and memory should stay bounded.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moekit.bench.hostile import MemoryUse, Oversized, SlowLoris, collect, peak_memory, run_apart


@dataclass(frozen=True)
class ClientLoad:
    """What `clients` concurrent clients got: generated tokens and completed requests in
    `seconds` of wall-clock time, the mean, median and 99th-percentile request latency, and
    the requests that failed (an error status or a broken connection)."""

    clients: int
    tokens: int
    seconds: float
    requests: int
    mean_latency_s: float
    p50_latency_s: float = 0.0
    p99_latency_s: float = 0.0
    errors: int = 0

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds

    def to_dict(self) -> dict[str, Any]:
        return {
            "clients": self.clients,
            "tokens": self.tokens,
            "seconds": self.seconds,
            "tokens_per_s": self.tokens_per_s,
            "requests": self.requests,
            "mean_latency_s": self.mean_latency_s,
            "p50_latency_s": self.p50_latency_s,
            "p99_latency_s": self.p99_latency_s,
            "errors": self.errors,
        }


@dataclass(frozen=True)
class ServeBench:
    """What `bench_serve` measured: one client's load, `many_clients`' load, and the mean
    number of sequences per decode step while the many clients ran."""

    model: str
    new_tokens: int
    one_client: ClientLoad
    many_clients: ClientLoad
    mean_decode_batch: float
    memory: MemoryUse | None = None
    slowloris: SlowLoris | None = None
    oversized: Oversized | None = None
    compiled_steps: int = 0  # decode steps through the compiled graph (with `compile`)

    @property
    def speedup(self) -> float:
        """Aggregate throughput of the many clients over one client's."""
        return self.many_clients.tokens_per_s / self.one_client.tokens_per_s

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "new_tokens": self.new_tokens,
            "one_client": self.one_client.to_dict(),
            "many_clients": self.many_clients.to_dict(),
            "speedup": self.speedup,
            "mean_decode_batch": self.mean_decode_batch,
            "memory": self.memory.to_dict() if self.memory else None,
            "slowloris": self.slowloris.to_dict() if self.slowloris else None,
            "oversized": self.oversized.to_dict() if self.oversized else None,
            "compiled_steps": self.compiled_steps,
        }


def percentile(values: list[float], q: float) -> float:
    """The `q`-quantile (0..1) of `values` by the nearest rank; 0 for none."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))]


def _client_load(url: str, model: str, clients: int, seconds: float, new_tokens: int) -> ClientLoad:
    import httpx

    tokens = [0] * clients
    latencies: list[float] = []
    errors = [0] * clients
    stop_at = time.monotonic() + seconds

    def run(i: int) -> None:
        with httpx.Client(timeout=300) as client:
            while time.monotonic() < stop_at:
                t0 = time.monotonic()
                try:
                    r = client.post(
                        f"{url}/v1/completions",
                        json={
                            "model": model,
                            "prompt": f"request {i}:",
                            "max_tokens": new_tokens,
                            "temperature": 0.8,
                            "ignore_eos": True,
                        },
                    )
                except httpx.HTTPError:
                    errors[i] += 1
                    continue
                if r.status_code != 200:
                    errors[i] += 1
                    continue
                tokens[i] += r.json()["usage"]["completion_tokens"]
                latencies.append(time.monotonic() - t0)

    start = time.monotonic()
    threads = [threading.Thread(target=run, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - start
    return ClientLoad(
        clients=clients,
        tokens=sum(tokens),
        seconds=elapsed,
        requests=len(latencies),
        mean_latency_s=sum(latencies) / max(len(latencies), 1),
        p50_latency_s=percentile(latencies, 0.5),
        p99_latency_s=percentile(latencies, 0.99),
        errors=sum(errors),
    )


def _hostile_beside(url: str, seconds: float, run: Any) -> tuple[Any, SlowLoris, Oversized]:
    """Run `run()` (the well-formed clients) with a slowloris and an oversized-request client
    beside it for the same `seconds`; returns run()'s result and theirs. The hostile clients
    run in processes of their own, as they would on other machines: their own work (building
    and sending megabytes) costs the server's process nothing but what the server does with
    their requests, and the memory sampled is the server's alone."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    loris = run_apart("slowloris", host, port, seconds)
    big = run_apart("oversized", url, "bench", seconds)
    try:
        result = run()
        slow, over = collect(loris), collect(big)
    finally:
        for process in (loris, big):
            if process.poll() is None:
                process.kill()
                process.wait()
    assert isinstance(slow, SlowLoris) and isinstance(over, Oversized)
    return result, slow, over


def bench_serve(
    model_dir: str | Path,
    *,
    clients: int = 8,
    seconds: float = 20.0,
    new_tokens: int = 32,
    hostile: bool = True,
    compile: bool = False,
) -> ServeBench:
    """Aggregate generated tokens/s with one client, then with `clients` at once, against a
    server on a free loopback port (`speedup` is the ratio), with each phase's latency
    percentiles and errors; with `hostile`, a slowloris and an oversized-request client run
    beside the `clients`, and the process's peak memory during that phase is reported. With
    `compile`, the server decodes through torch.compile, compiled before the clients start
    (`compiled_steps` counts the steps that ran compiled)."""
    results: dict[str, Any] = {}

    def drive(url: str, engine: Any) -> None:
        try:
            _client_load(url, "bench", 1, min(2.0, seconds), new_tokens)  # warm up
            results["one"] = _client_load(url, "bench", 1, seconds, new_tokens)
            steps0, rows0 = engine.stats.decode_steps, engine.stats.batched_tokens
            with peak_memory() as memory:

                def many() -> ClientLoad:
                    return _client_load(url, "bench", clients, seconds, new_tokens)

                if hostile:
                    results["many"], results["slowloris"], results["oversized"] = _hostile_beside(
                        url, seconds, many
                    )
                else:
                    results["many"] = many()
            results["memory"] = memory[0]
            results["steps"] = engine.stats.decode_steps - steps0
            results["rows"] = engine.stats.batched_tokens - rows0
            results["compiled"] = engine.compiled.steps if engine.compiled is not None else 0
        except Exception as e:  # reported below, from the main thread
            results["error"] = e

    _serve_while(model_dir, drive, max_batch=max(clients, 1), compile=compile)
    if "error" in results:
        raise results["error"]
    return ServeBench(
        model=str(model_dir),
        new_tokens=new_tokens,
        one_client=results["one"],
        many_clients=results["many"],
        mean_decode_batch=results["rows"] / max(results["steps"], 1),
        memory=results["memory"],
        slowloris=results.get("slowloris"),
        oversized=results.get("oversized"),
        compiled_steps=results["compiled"],
    )


def _serve_while(model_dir: str | Path, drive: Any, **options: Any) -> None:
    """Serve `model_dir` (built with `options`) on a free loopback port while
    `drive(url, engine)` runs in another thread; the engine runs in this (main) thread, as
    `moekit serve` runs it, and stops when `drive` returns (what `drive` raises is raised
    here)."""
    from moekit.serve import build
    from moekit.serve.server import http_server

    app, engine = build(model_dir, model_name="bench", **options)
    if engine.compiled is not None:
        engine.compiled.warm_up()
    server = http_server(app, "127.0.0.1", 0)
    http = threading.Thread(target=server.run, daemon=True)
    http.start()

    errors: list[Exception] = []

    def run() -> None:
        try:
            drive(_wait_for(server), engine)
        except Exception as e:  # raised below, from the main thread
            errors.append(e)
        finally:
            engine.stop()

    driver = threading.Thread(target=run)
    driver.start()
    engine.run()
    driver.join()
    server.should_exit = True
    http.join(timeout=30)
    if errors:
        raise errors[0]


def _wait_for(server: Any) -> str:
    """The URL of `server` once it listens (a RuntimeError after a minute without)."""
    deadline = time.monotonic() + 60
    while not (server.started and server.servers):
        if time.monotonic() > deadline:
            raise RuntimeError("the benchmark server did not start")
        time.sleep(0.01)
    return f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"


# ---- prefix caching: time to first token with and without it ---------------------------------


@dataclass(frozen=True)
class PrefixBench:
    """What `bench_prefix` measured: each request's time to first token without the prefix
    cache (`ttft_off_s`) and with it (`ttft_on_s`), for prompts of `shared_prefix` shared tokens
    and `suffix_tokens` of their own; the prompt tokens each cached request reused, and what
    the cache costs in memory per token."""

    model: str
    shared_prefix: int
    suffix_tokens: int
    ttft_off_s: list[float]
    ttft_on_s: list[float]
    cached_tokens: int
    bytes_per_token: int
    capacity_tokens: int

    @property
    def off_s(self) -> float:
        return percentile(self.ttft_off_s, 0.5)

    @property
    def on_s(self) -> float:
        return percentile(self.ttft_on_s, 0.5)

    @property
    def speedup(self) -> float:
        """Median time to first token without the cache over the median with it."""
        return self.off_s / self.on_s

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "shared_prefix": self.shared_prefix,
            "suffix_tokens": self.suffix_tokens,
            "ttft_off_s": self.ttft_off_s,
            "ttft_on_s": self.ttft_on_s,
            "median_off_s": self.off_s,
            "median_on_s": self.on_s,
            "speedup": self.speedup,
            "cached_tokens": self.cached_tokens,
            "bytes_per_token": self.bytes_per_token,
            "capacity_tokens": self.capacity_tokens,
        }


def _first_token(client: Any, url: str, prompt: list[int]) -> tuple[float, int]:
    """Send a streamed one-token completion of `prompt`; (seconds to its first chunk, the
    prompt tokens its usage says were cached)."""
    import json

    body = {"model": "bench", "prompt": prompt, "max_tokens": 1, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}  # fmt: skip
    t0 = time.monotonic()
    first, cached = None, 0
    with client.stream("POST", f"{url}/v1/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"the server answered {r.status_code}: {r.read().decode()}")
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            first = first if first is not None else time.monotonic() - t0
            usage = json.loads(line.removeprefix("data: ")).get("usage")
            if usage:
                cached = usage["prompt_tokens_details"]["cached_tokens"]
    assert first is not None, "the stream sent no chunk"
    return first, cached


def bench_prefix(
    model_dir: str | Path,
    *,
    shared_prefix: int,
    requests: int = 5,
    suffix_tokens: int = 16,
    max_context: int | None = None,
) -> PrefixBench:
    """Time to first token of prompts that share their first `shared_prefix` tokens (random
    ids) and differ in their last `suffix_tokens`, without the prefix cache and with it,
    against one server on a free loopback port: `requests` of each, one at a time, taking turns
    (the cache is switched off and on between them), after one unmeasured request of each. The
    cache holds twice a prompt; with it, each measured prompt finds the shared blocks stored by
    the ones before. A ValueError when a prompt does not fit `max_context`."""
    if shared_prefix < 1 or suffix_tokens < 1 or requests < 1:
        raise ValueError("shared_prefix, suffix_tokens and requests must be >= 1")
    from moekit.serve.prefix_cache import DEFAULT_BLOCK_TOKENS

    block = DEFAULT_BLOCK_TOKENS
    capacity = -(-2 * (shared_prefix + suffix_tokens) // block) * block
    results: dict[str, Any] = {}

    def drive(url: str, engine: Any) -> None:
        import httpx
        import torch

        length = shared_prefix + suffix_tokens
        if length + 1 > engine.max_context:
            raise ValueError(
                f"a prompt of {length} tokens (--shared-prefix {shared_prefix} + "
                f"{suffix_tokens}) and one new token does not fit the server's max_context "
                f"{engine.max_context}; shorten --shared-prefix"
            )
        rng = torch.Generator().manual_seed(0)
        vocab = engine.cfg.vocab_size
        shared = torch.randint(0, vocab, (shared_prefix,), generator=rng).tolist()
        cache = engine.prefix_cache
        times: dict[bool, list[float]] = {False: [], True: []}
        reused = []
        with httpx.Client(timeout=600) as client:
            for i in range(requests + 1):
                for on in (False, True):
                    suffix = torch.randint(0, vocab, (suffix_tokens,), generator=rng).tolist()
                    engine.prefix_cache = cache if on else None  # between requests: idle
                    seconds, cached = _first_token(client, url, [*shared, *suffix])
                    if i > 0:  # the first of each warms up (and stores the shared blocks)
                        times[on].append(seconds)
                        reused += [cached] if on else []
        results.update(off=times[False], on=times[True], cached=min(reused), cache=cache)

    _serve_while(model_dir, drive, max_context=max_context, prefix_cache_tokens=capacity)
    cache = results["cache"]
    return PrefixBench(
        model=str(model_dir),
        shared_prefix=shared_prefix,
        suffix_tokens=suffix_tokens,
        ttft_off_s=results["off"],
        ttft_on_s=results["on"],
        cached_tokens=results["cached"],
        bytes_per_token=cache.bytes_per_token,
        capacity_tokens=cache.capacity_tokens,
    )
