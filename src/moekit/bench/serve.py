"""`moekit bench serve`: aggregate decode throughput of the server with 1 and with N concurrent
clients, measured in one run against a real server on loopback.

Each client sends back-to-back completion requests of `new_tokens` tokens (end-of-text
ignored, so every request generates exactly that many) for `seconds`; throughput is the
generated tokens over the wall-clock time. Dynamic batching should make N clients' aggregate
far higher than one client's.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class ClientLoad:
    """What `clients` concurrent clients got: generated tokens and completed requests in
    `seconds` of wall-clock time, and the mean request latency."""

    clients: int
    tokens: int
    seconds: float
    requests: int
    mean_latency_s: float

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
        }


def _client_load(url: str, model: str, clients: int, seconds: float, new_tokens: int) -> ClientLoad:
    import httpx

    tokens = [0] * clients
    latencies: list[float] = []
    stop_at = time.monotonic() + seconds

    def run(i: int) -> None:
        with httpx.Client(timeout=300) as client:
            while time.monotonic() < stop_at:
                t0 = time.monotonic()
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
                r.raise_for_status()
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
    )


def bench_serve(
    model_dir: str | Path, *, clients: int = 8, seconds: float = 20.0, new_tokens: int = 32
) -> ServeBench:
    """Aggregate generated tokens/s with one client, then with `clients` at once, against a
    server on a free loopback port; `speedup` is the ratio."""
    import uvicorn

    from moekit.serve import build

    app, engine = build(model_dir, model_name="bench", max_batch=max(clients, 1))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    http = threading.Thread(target=server.run, daemon=True)
    http.start()
    results: dict[str, Any] = {}

    def drive() -> None:
        try:
            deadline = time.monotonic() + 60
            while not (server.started and server.servers):
                if time.monotonic() > deadline:
                    raise RuntimeError("the benchmark server did not start")
                time.sleep(0.01)
            url = f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
            _client_load(url, "bench", 1, min(2.0, seconds), new_tokens)  # warm up
            results["one"] = _client_load(url, "bench", 1, seconds, new_tokens)
            steps0, rows0 = engine.stats.decode_steps, engine.stats.batched_tokens
            results["many"] = _client_load(url, "bench", clients, seconds, new_tokens)
            results["steps"] = engine.stats.decode_steps - steps0
            results["rows"] = engine.stats.batched_tokens - rows0
        except Exception as e:  # reported below, from the main thread
            results["error"] = e
        finally:
            engine.stop()

    # The engine runs in this (main) thread, as `moekit serve` runs it; clients in another.
    driver = threading.Thread(target=drive)
    driver.start()
    engine.run()
    driver.join()
    server.should_exit = True
    http.join(timeout=30)
    if "error" in results:
        raise results["error"]
    return ServeBench(
        model=str(model_dir),
        new_tokens=new_tokens,
        one_client=results["one"],
        many_clients=results["many"],
        mean_decode_batch=results["rows"] / max(results["steps"], 1),
    )
