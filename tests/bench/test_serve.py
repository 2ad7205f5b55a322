import pytest

from moekit.bench.serve import ClientLoad, ServeBench

# The keys of `moekit bench serve --json`, in order, and of each client load in it.
KEYS = ["model", "new_tokens", "one_client", "many_clients", "speedup", "mean_decode_batch"]
LOAD_KEYS = ["clients", "tokens", "seconds", "tokens_per_s", "requests", "mean_latency_s"]


def test_bench_serve_measures_one_and_many_clients(tiny_model_dir):
    for module in ("fastapi", "uvicorn", "httpx"):
        pytest.importorskip(module)
    from moekit.bench.serve import bench_serve

    result = bench_serve(tiny_model_dir, clients=4, seconds=1.5, new_tokens=8)
    assert result.one_client.tokens > 0 and result.many_clients.tokens > 0
    assert result.many_clients.clients == 4
    assert result.speedup == pytest.approx(
        result.many_clients.tokens_per_s / result.one_client.tokens_per_s
    )
    assert result.mean_decode_batch > 1  # the clients' requests shared decode steps
    data = result.to_dict()
    assert list(data) == KEYS
    assert list(data["one_client"]) == list(data["many_clients"]) == LOAD_KEYS


def test_to_dict_has_the_json_keys():
    one = ClientLoad(clients=1, tokens=100, seconds=2.0, requests=4, mean_latency_s=0.5)
    many = ClientLoad(clients=8, tokens=600, seconds=2.0, requests=24, mean_latency_s=0.6)
    data = ServeBench(model="m", new_tokens=25, one_client=one, many_clients=many,
                      mean_decode_batch=6.5).to_dict()  # fmt: skip
    assert list(data) == KEYS
    assert list(data["one_client"]) == list(data["many_clients"]) == LOAD_KEYS
    assert data["one_client"]["tokens_per_s"] == 50.0
    assert data["many_clients"]["tokens_per_s"] == 300.0
    assert data["speedup"] == 6.0
