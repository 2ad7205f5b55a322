"""What /metrics reports: the HTTP counters the guard keeps, the connection counters the HTTP
server keeps (connections.py), and the engine's own, as Prometheus text (exposition format
0.0.4)."""

from __future__ import annotations

from dataclasses import dataclass, field

from moekit.serve.engine import Engine
from moekit.serve.prefix_cache import prometheus_lines

CONTENT_TYPE = "text/plain; version=0.0.4"
# Metrics are labelled by endpoint; any other path under /v1/ counts as "other", so that
# clients probing random paths cannot grow the label set without bound.
API_ENDPOINTS = frozenset(
    {"/v1/models", "/v1/completions", "/v1/chat/completions", "/v1/moekit/info"}
)


def endpoint_label(path: str) -> str | None:
    """The `endpoint` label a request to `path` counts under; None for paths outside /v1/
    (the page, /health, /metrics), which are not counted."""
    if not path.startswith("/v1/"):
        return None
    return path if path in API_ENDPOINTS else "other"


@dataclass
class ConnectionStats:
    """What the HTTP server saw of connections: how many are open, how many were refused past
    the connection limit, and how many were cut off for sending too slowly, by what they were
    sending ("head" or "body")."""

    open: int = 0
    refused: int = 0
    timed_out: dict[str, int] = field(default_factory=dict)


@dataclass
class Metrics:
    """Requests by (endpoint, status), and the summed latency and count per endpoint; requests
    whose client went away before an answer started (`disconnects`, by endpoint: neither a
    status nor a latency); and the connections (filled in by the HTTP server)."""

    requests: dict[tuple[str, int], int] = field(default_factory=dict)
    latency_sum: dict[str, float] = field(default_factory=dict)
    latency_count: dict[str, int] = field(default_factory=dict)
    disconnects: dict[str, int] = field(default_factory=dict)
    connections: ConnectionStats = field(default_factory=ConnectionStats)

    def observe(self, endpoint: str, status: int, seconds: float) -> None:
        self.requests[(endpoint, status)] = self.requests.get((endpoint, status), 0) + 1
        self.latency_sum[endpoint] = self.latency_sum.get(endpoint, 0.0) + seconds
        self.latency_count[endpoint] = self.latency_count.get(endpoint, 0) + 1

    def client_left(self, endpoint: str) -> None:
        self.disconnects[endpoint] = self.disconnects.get(endpoint, 0) + 1


def prometheus_text(engine: Engine, metrics: Metrics) -> str:
    """Every metric, HTTP and engine, as one Prometheus text page."""
    lines = [*_http_lines(metrics), *_connection_lines(metrics.connections)]
    lines += [*_engine_lines(engine), *_offload_lines(getattr(engine, "model", None))]
    lines += prometheus_lines(getattr(engine, "prefix_cache", None))
    return "\n".join(lines) + "\n"


def _http_lines(metrics: Metrics) -> list[str]:
    lines = [
        "# HELP moekit_requests_total HTTP requests to the API, by endpoint and status.",
        "# TYPE moekit_requests_total counter",
    ]
    for (endpoint, status), n in sorted(metrics.requests.items()):
        lines.append(f'moekit_requests_total{{endpoint="{endpoint}",status="{status}"}} {n}')
    lines += [
        "# HELP moekit_request_latency_seconds Time to answer an API request (to the last byte "
        "for non-streaming, to the first for streaming).",
        "# TYPE moekit_request_latency_seconds summary",
    ]
    for endpoint in sorted(metrics.latency_count):
        label = f'{{endpoint="{endpoint}"}}'
        lines.append(
            f"moekit_request_latency_seconds_sum{label} {metrics.latency_sum[endpoint]:.6f}"
        )
        lines.append(
            f"moekit_request_latency_seconds_count{label} {metrics.latency_count[endpoint]}"
        )
    lines += [
        "# HELP moekit_client_disconnects_total API requests whose client went away before an "
        "answer started (mid-upload or while waiting), by endpoint; not in the counts above.",
        "# TYPE moekit_client_disconnects_total counter",
    ]
    for endpoint, n in sorted(metrics.disconnects.items()):
        lines.append(f'moekit_client_disconnects_total{{endpoint="{endpoint}"}} {n}')
    return lines


def _connection_lines(c: ConnectionStats) -> list[str]:
    return [
        "# HELP moekit_open_connections HTTP connections open now.",
        "# TYPE moekit_open_connections gauge",
        f"moekit_open_connections {c.open}",
        "# HELP moekit_refused_connections_total Connections refused past the connection limit.",
        "# TYPE moekit_refused_connections_total counter",
        f"moekit_refused_connections_total {c.refused}",
        "# HELP moekit_timed_out_connections_total Connections cut off for sending a request "
        "too slowly, by what they were sending (head or body).",
        "# TYPE moekit_timed_out_connections_total counter",
        *(
            f'moekit_timed_out_connections_total{{phase="{phase}"}} {n}'
            for phase, n in sorted(c.timed_out.items())
        ),
    ]


def _engine_lines(engine: Engine) -> list[str]:
    s = engine.stats
    lines = [
        "# HELP moekit_prompt_tokens_total Prompt tokens prefilled.",
        "# TYPE moekit_prompt_tokens_total counter",
        f"moekit_prompt_tokens_total {s.prompt_tokens}",
        "# HELP moekit_generated_tokens_total Tokens generated.",
        "# TYPE moekit_generated_tokens_total counter",
        f"moekit_generated_tokens_total {s.generated_tokens}",
        "# HELP moekit_finished_requests_total Generations finished, by reason.",
        "# TYPE moekit_finished_requests_total counter",
        *(
            f'moekit_finished_requests_total{{reason="{r}"}} {n}'
            for r, n in sorted(s.finished.items())
        ),
        "# HELP moekit_queue_depth Requests waiting for a batch slot.",
        "# TYPE moekit_queue_depth gauge",
        f"moekit_queue_depth {engine.queue_depth}",
        "# HELP moekit_active_requests Requests being generated.",
        "# TYPE moekit_active_requests gauge",
        f"moekit_active_requests {engine.active}",
        "# HELP moekit_decode_steps_total Batched decode steps.",
        "# TYPE moekit_decode_steps_total counter",
        f"moekit_decode_steps_total {s.decode_steps}",
        "# HELP moekit_decode_batch_tokens_total Tokens decoded over all steps (divide by steps "
        "for the mean batch size).",
        "# TYPE moekit_decode_batch_tokens_total counter",
        f"moekit_decode_batch_tokens_total {s.batched_tokens}",
        "# HELP moekit_compiled_decode_steps_total Decode steps run through the compiled graph "
        "(--compile).",
        "# TYPE moekit_compiled_decode_steps_total counter",
        f"moekit_compiled_decode_steps_total {engine.compiled.steps if engine.compiled else 0}",
        "# HELP moekit_speculative_drafted_tokens_total Prompt-lookup drafts checked "
        "(--speculative ngram).",
        "# TYPE moekit_speculative_drafted_tokens_total counter",
        f"moekit_speculative_drafted_tokens_total {s.drafted_tokens}",
        "# HELP moekit_speculative_accepted_tokens_total Drafts kept.",
        "# TYPE moekit_speculative_accepted_tokens_total counter",
        f"moekit_speculative_accepted_tokens_total {s.accepted_tokens}",
        "# HELP moekit_expert_tokens_total Generated tokens routed to each expert, by MoE layer.",
        "# TYPE moekit_expert_tokens_total counter",
    ]
    for layer, counts in sorted(s.expert_tokens.items()):
        for e, n in enumerate(counts.tolist()):
            lines.append(f'moekit_expert_tokens_total{{layer="{layer}",expert="{e}"}} {n}')
    return lines


_OFFLOAD = (  # name, kind, help, LayerMetrics field
    ("expert_cache_hits_total", "counter", "Experts found in the cache, by MoE layer.", "hits"),
    ("expert_cache_misses_total", "counter", "Experts read on demand, by MoE layer.", "misses"),
    ("expert_bytes_read_total", "counter", "Bytes of experts read, by MoE layer.", "bytes_read"),
    ("expert_stall_seconds_total", "counter", "Time spent waiting for expert reads.", "stall_s"),
    ("expert_cache_slots", "gauge", "Experts the cache holds, by MoE layer.", "slots"),
)


def _offload_lines(model: object) -> list[str]:
    """Expert-cache metrics per MoE layer when the experts are paged (--max-memory)."""
    from moekit.infer.offload import offload_metrics

    layers = offload_metrics(model) if model is not None else []
    lines: list[str] = []
    for name, kind, text, attr in _OFFLOAD if layers else ():
        lines += [f"# HELP moekit_{name} {text}", f"# TYPE moekit_{name} {kind}"]
        lines += [f'moekit_{name}{{layer="{m.layer}"}} {getattr(m, attr)}' for m in layers]
    return lines
