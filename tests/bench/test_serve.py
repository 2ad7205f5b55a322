import pytest

from moekit.bench.serve import ClientLoad, ServeBench

# The keys of `moekit bench serve --json`, in order, and of each client load in it.
KEYS = ["model", "new_tokens", "one_client", "many_clients", "speedup", "mean_decode_batch",
        "memory", "slowloris", "oversized", "compiled_steps"]  # fmt: skip
LOAD_KEYS = ["clients", "tokens", "seconds", "tokens_per_s", "requests", "mean_latency_s",
             "p50_latency_s", "p99_latency_s", "errors"]  # fmt: skip


def test_bench_serve_measures_one_and_many_clients(tiny_model_dir):
    for module in ("fastapi", "uvicorn", "httpx"):
        pytest.importorskip(module)
    from moekit.bench.serve import bench_serve

    result = bench_serve(tiny_model_dir, clients=4, seconds=1.5, new_tokens=8, hostile=False)
    assert result.one_client.tokens > 0 and result.many_clients.tokens > 0
    assert result.one_client.errors == result.many_clients.errors == 0
    for load in (result.one_client, result.many_clients):
        assert 0 < load.p50_latency_s <= load.p99_latency_s
    assert result.slowloris is None and result.oversized is None
    assert result.memory is not None and result.memory.peak_bytes >= result.memory.before_bytes
    assert result.many_clients.clients == 4
    assert result.speedup == pytest.approx(
        result.many_clients.tokens_per_s / result.one_client.tokens_per_s
    )
    assert result.mean_decode_batch > 1  # the clients' requests shared decode steps
    data = result.to_dict()
    assert list(data) == KEYS
    assert list(data["one_client"]) == list(data["many_clients"]) == LOAD_KEYS


def test_bench_serve_with_the_compiled_step(tiny_model_dir):
    for module in ("fastapi", "uvicorn", "httpx"):
        pytest.importorskip(module)
    from moekit.bench.serve import bench_serve

    result = bench_serve(
        tiny_model_dir, clients=1, seconds=1.0, new_tokens=8, hostile=False, compile=True
    )
    assert result.many_clients.tokens > 0 and result.many_clients.errors == 0
    assert result.compiled_steps > 0  # compiled before the clients, used for their steps


@pytest.mark.slow
def test_hostile_clients_beside_the_well_formed_ones(tiny_model_dir):
    for module in ("fastapi", "uvicorn", "httpx"):
        pytest.importorskip(module)
    from moekit.bench.hostile import SLOWLORIS_CONNECTIONS
    from moekit.bench.serve import bench_serve

    result = bench_serve(tiny_model_dir, clients=3, seconds=2.0, new_tokens=4)
    assert result.many_clients.errors == 0 and result.many_clients.requests > 0
    assert result.slowloris is not None and result.slowloris.connections == SLOWLORIS_CONNECTIONS
    assert result.oversized is not None and result.oversized.requests > 0
    # Every oversized request is refused as the client's fault, none crashes the server.
    assert result.oversized.refused == result.oversized.requests, result.oversized.statuses
    assert list(result.to_dict()) == KEYS


def test_percentiles_by_nearest_rank():
    from moekit.bench.serve import percentile

    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 0.5) == 50.0 and percentile(values, 0.99) == 99.0
    assert percentile([3.0], 0.99) == 3.0 and percentile([], 0.5) == 0.0


def test_to_dict_has_the_json_keys():
    one = ClientLoad(clients=1, tokens=100, seconds=2.0, requests=4, mean_latency_s=0.5)
    many = ClientLoad(clients=8, tokens=600, seconds=2.0, requests=24, mean_latency_s=0.6)
    data = ServeBench(model="m", new_tokens=25, one_client=one, many_clients=many,
                      mean_decode_batch=6.5).to_dict()  # fmt: skip
    assert data["memory"] is None and data["slowloris"] is None
    assert list(data) == KEYS
    assert list(data["one_client"]) == list(data["many_clients"]) == LOAD_KEYS
    assert data["one_client"]["tokens_per_s"] == 50.0
    assert data["many_clients"]["tokens_per_s"] == 300.0
    assert data["speedup"] == 6.0


def test_bench_prefix_times_first_tokens_with_and_without_the_cache(tiny_model_dir):
    for module in ("fastapi", "uvicorn", "httpx"):
        pytest.importorskip(module)
    from moekit.bench.serve import bench_prefix

    result = bench_prefix(tiny_model_dir, shared_prefix=70, requests=2, suffix_tokens=8)
    assert len(result.ttft_off_s) == len(result.ttft_on_s) == 2
    assert all(t > 0 for t in (*result.ttft_off_s, *result.ttft_on_s))
    assert result.cached_tokens == 64  # the shared prompt's whole blocks
    assert result.bytes_per_token == 2 * 2 * 32 * 4  # layers x kv heads x (k + v) x float32
    assert result.capacity_tokens >= 2 * 78
    assert result.speedup == pytest.approx(result.off_s / result.on_s)
    assert list(result.to_dict())[-3:] == ["cached_tokens", "bytes_per_token", "capacity_tokens"]
    with pytest.raises(ValueError, match="does not fit the server's max_context 128"):
        bench_prefix(tiny_model_dir, shared_prefix=120, requests=1)


def test_the_bench_command_prints_the_ratio(tiny_model_dir, capsys):
    pytest.importorskip("uvicorn")
    from moekit.cli import main

    assert main(["bench", "serve", str(tiny_model_dir), "--shared-prefix", "40",
                 "--requests", "1"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "without the prefix cache" in out and "speed-up" in out
    assert "(32 prompt tokens reused)" in out
