"""/metrics: HTTP and engine counters as Prometheus text."""

import httpx
import torch


def test_metrics(server, client):
    url, _ = server
    client.completions.create(model="tiny", prompt="a", max_tokens=3)
    text = httpx.get(f"{url}/metrics").text
    for name in ("moekit_requests_total", "moekit_generated_tokens_total", "moekit_request_latency_seconds_sum",
                 "moekit_queue_depth", "moekit_expert_tokens_total"):  # fmt: skip
        assert name in text
    ok = 'moekit_requests_total{endpoint="/v1/completions",status="200"}'
    line = next(row for row in text.splitlines() if row.startswith(ok))
    assert int(line.split()[-1]) >= 1


def test_unknown_api_paths_share_one_metrics_label(server):
    url, _ = server
    for i in range(3):
        assert httpx.get(f"{url}/v1/no/such/path/{i}").status_code == 404
    text = httpx.get(f"{url}/metrics").text
    assert "/v1/no/such/path" not in text
    assert 'moekit_requests_total{endpoint="other",status="404"}' in text


def test_only_api_paths_are_counted_and_unknown_ones_share_a_label():
    from moekit.serve.metrics import endpoint_label

    assert endpoint_label("/v1/completions") == "/v1/completions"
    assert endpoint_label("/v1/anything/else") == "other"
    assert endpoint_label("/health") is None and endpoint_label("/metrics") is None


def test_prometheus_text_reports_http_and_engine_counters():
    from types import SimpleNamespace

    from moekit.serve.engine import EngineStats
    from moekit.serve.metrics import Metrics, prometheus_text

    metrics = Metrics()
    metrics.observe("/v1/completions", 200, 0.5)
    metrics.observe("/v1/completions", 200, 0.25)
    metrics.observe("other", 404, 0.001)
    stats = EngineStats(prompt_tokens=7, generated_tokens=11, decode_steps=3, batched_tokens=6)
    stats.finished["length"] = 2
    stats.expert_tokens[1] = torch.tensor([4, 0])
    engine = SimpleNamespace(stats=stats, queue_depth=5, active=1, compiled=None)
    rows = prometheus_text(engine, metrics).splitlines()  # type: ignore[arg-type]
    for row in (
        'moekit_requests_total{endpoint="/v1/completions",status="200"} 2',
        'moekit_requests_total{endpoint="other",status="404"} 1',
        'moekit_request_latency_seconds_sum{endpoint="/v1/completions"} 0.750000',
        'moekit_request_latency_seconds_count{endpoint="/v1/completions"} 2',
        "moekit_prompt_tokens_total 7",
        "moekit_generated_tokens_total 11",
        'moekit_finished_requests_total{reason="length"} 2',
        "moekit_queue_depth 5",
        "moekit_active_requests 1",
        "moekit_decode_steps_total 3",
        "moekit_decode_batch_tokens_total 6",
        'moekit_expert_tokens_total{layer="1",expert="0"} 4',
        'moekit_expert_tokens_total{layer="1",expert="1"} 0',
    ):
        assert row in rows, row
    # Every sample has a HELP and a TYPE line for its metric.
    names = {r.split("{")[0].split()[0] for r in rows if not r.startswith("#")}
    helped = {r.split()[2] for r in rows if r.startswith("# HELP")}
    assert {n.removesuffix("_sum").removesuffix("_count") for n in names} <= helped
