"""The server, driven by the official openai client and by raw HTTP."""

import concurrent.futures
import json
import time

import httpx
import pytest

from moekit.infer.generate import Generator
from moekit.infer.sampling import SamplingParams

from .conftest import running_server

openai = pytest.importorskip("openai")


@pytest.fixture(scope="module")
def client(server):
    url, _ = server
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused")


@pytest.fixture(scope="module")
def reference(tiny_model_dir):
    return Generator.from_dir(tiny_model_dir)


def greedy(reference, prompt, n):
    return reference.generate(prompt, SamplingParams(temperature=0, max_new_tokens=n))[0].text


def test_models(client):
    assert [m.id for m in client.models.list().data] == ["tiny"]


def test_completion_matches_the_library(client, reference):
    out = client.completions.create(
        model="tiny", prompt="def add(a, b):", max_tokens=12, temperature=0
    )
    assert out.choices[0].text == greedy(reference, "def add(a, b):", 12)
    assert (
        out.usage.completion_tokens == len(reference.tokenizer.encode(out.choices[0].text))
        or out.usage.completion_tokens <= 12
    )
    assert out.usage.prompt_tokens == len(reference.tokenizer.encode("def add(a, b):"))
    assert out.choices[0].finish_reason in ("length", "stop")


def test_streaming_completion(client, reference):
    chunks = list(
        client.completions.create(
            model="tiny", prompt="The", max_tokens=10, temperature=0, stream=True
        )
    )
    assert "".join(c.choices[0].text for c in chunks) == greedy(reference, "The", 10)
    assert chunks[-1].choices[0].finish_reason in ("length", "stop")


def test_chat_and_streaming_chat(client):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello"}]
    out = client.chat.completions.create(
        model="tiny", messages=messages, max_tokens=8, temperature=0
    )
    assert out.choices[0].message.role == "assistant"
    stream = client.chat.completions.create(model="tiny", messages=messages, max_tokens=8, temperature=0, stream=True,
                                            stream_options={"include_usage": True})  # fmt: skip
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == out.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == out.usage.completion_tokens


def test_sse_wire_format(server):
    url, _ = server
    with httpx.stream(
        "POST",
        f"{url}/v1/completions",
        json={"model": "tiny", "prompt": "x", "max_tokens": 3, "stream": True},
    ) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        body = r.read().decode()
    events = [e for e in body.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    for e in events[:-1]:
        assert json.loads(e[6:])["object"] == "text_completion"


def test_seeded_sampling_n_and_stop(client, reference):
    a = client.completions.create(
        model="tiny", prompt="The", max_tokens=10, temperature=1.0, seed=5, n=2
    )
    b = client.completions.create(
        model="tiny", prompt="The", max_tokens=10, temperature=1.0, seed=5, n=2
    )
    assert [c.text for c in a.choices] == [c.text for c in b.choices]
    assert [c.index for c in a.choices] == [0, 1]
    free = greedy(reference, "The", 20)
    stop = free[4:7]
    out = client.completions.create(
        model="tiny", prompt="The", max_tokens=20, temperature=0, stop=[stop]
    )
    assert out.choices[0].text == free[: free.find(stop)] and out.choices[0].finish_reason == "stop"


def test_echo_and_logprobs_for_scoring(client, reference):
    """The request lm-evaluation-harness makes to score a continuation."""
    out = client.completions.create(
        model="tiny", prompt="The cat sat", max_tokens=1, temperature=0, echo=True, logprobs=2
    )
    lp = out.choices[0].logprobs
    prompt_tokens = len(reference.tokenizer.encode("The cat sat"))
    assert out.choices[0].text.startswith("The cat sat")
    assert lp.token_logprobs[0] is None and len(lp.tokens) == prompt_tokens + 1
    assert all(v <= 0 for v in lp.token_logprobs[1:])
    assert all(len(t) == 2 for t in lp.top_logprobs[1:])
    # The logprob of each prompt token equals the library's.
    import torch

    ids = reference.tokenizer.encode("The cat sat")
    with torch.no_grad():
        logits = reference.model(torch.tensor([ids]), causal_routing=True).logits[0]
    expected = torch.log_softmax(logits, -1)[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]
    assert lp.token_logprobs[1:prompt_tokens] == pytest.approx(expected.tolist(), abs=1e-4)


def test_routing_extension_and_experts_per_token(server):
    url, _ = server
    r = httpx.post(f"{url}/v1/completions", json={"model": "tiny", "prompt": "a", "max_tokens": 4, "temperature": 0,
                                                 "moekit": {"routing": True, "top_k": 1}})  # fmt: skip
    routing = r.json()["choices"][0]["moekit"]["routing"]
    assert len(routing) == r.json()["usage"]["completion_tokens"]
    for token in routing:
        assert set(token["layers"]) == {"0", "1"}
        assert all(
            len(pairs) == 1 and pairs[0][1] == pytest.approx(1.0)
            for pairs in token["layers"].values()
        )
    r = httpx.post(
        f"{url}/v1/completions", json={"model": "tiny", "prompt": "a", "moekit": {"top_k": 9}}
    )
    assert r.status_code == 400 and "at most 8" in r.json()["error"]["message"]


@pytest.mark.parametrize(
    ("body", "status", "needle"),
    [
        (b"{not json", 400, "not valid JSON"),
        (b"[1, 2]", 400, "must be a JSON object"),
        (json.dumps({"model": "tiny"}).encode(), 400, "missing required parameter 'prompt'"),
        (json.dumps({"model": "tiny", "prompt": 5}).encode(), 400, "invalid value for 'prompt'"),
        (json.dumps({"model": "gpt-9", "prompt": "a"}).encode(), 404, "does not exist"),
        (json.dumps({"model": "tiny", "prompt": "a", "max_tokens": 0}).encode(), 400, "at least 1"),
        (json.dumps({"model": "tiny", "prompt": "a", "max_tokens": 101}).encode(), 400, "at most 100"),
        (json.dumps({"model": "tiny", "prompt": "a", "temperature": 3}).encode(), 400, "'temperature'"),
        (json.dumps({"model": "tiny", "prompt": "a", "presence_penalty": 1}).encode(), 400, "not supported"),
        (json.dumps({"model": "tiny", "prompt": [9999]}).encode(), 400, "token ids must be in"),
        (json.dumps({"model": "tiny", "prompt": "word " * 200, "max_tokens": 10}).encode(), 400, "maximum context length"),
        (json.dumps({"model": "tiny", "prompt": "a", "stop": ["a", "b", "c", "d", "e"]}).encode(), 400, "at most 4"),
        (b"{" + b" " * (1 << 20) + b"}", 413, "larger than"),
    ],
    ids=["malformed", "not-object", "missing", "wrong-type", "unknown-model", "max-tokens-0",
         "max-tokens-limit", "temperature", "penalty", "token-id", "too-long", "stops", "oversize"],
)  # fmt: skip
def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(server, body, status, needle):
    url, _ = server
    r = httpx.post(
        f"{url}/v1/completions", content=body, headers={"Content-Type": "application/json"}
    )
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert needle in error["message"] and {"type", "param", "code"} <= set(error)
    assert (
        httpx.post(
            f"{url}/v1/completions", json={"model": "tiny", "prompt": "ok", "max_tokens": 2}
        ).status_code
        == 200
    )


def test_chat_errors(server):
    url, _ = server
    r = httpx.post(f"{url}/v1/chat/completions", json={"model": "tiny", "messages": []})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    r = httpx.post(
        f"{url}/v1/chat/completions",
        json={"model": "tiny", "messages": [{"role": "robot", "content": "x"}]},
    )
    assert r.status_code == 400
    r = httpx.post(
        f"{url}/v1/chat/completions",
        json={"model": "tiny", "messages": [{"role": "user", "content": "w " * 300}]},
    )
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"


def test_twenty_concurrent_requests_are_all_answered_correctly(server, reference):
    url, engine = server
    prompts = [f"{i} + {i} = " for i in range(20)]
    steps_before = engine.stats.decode_steps

    def ask(prompt):
        r = httpx.post(f"{url}/v1/completions", json={"model": "tiny", "prompt": prompt, "max_tokens": 8,
                                                     "temperature": 0, "ignore_eos": True}, timeout=120)  # fmt: skip
        return r.status_code, r.json()["choices"][0]["text"]

    with concurrent.futures.ThreadPoolExecutor(20) as pool:
        results = list(pool.map(ask, prompts))
    for prompt, (status, text) in zip(prompts, results, strict=True):
        assert status == 200
        params = SamplingParams(temperature=0, max_new_tokens=8, ignore_eos=True)
        assert text == reference.generate(prompt, params)[0].text  # batching changes nothing
    # They really were decoded together: far fewer steps than tokens.
    steps = engine.stats.decode_steps - steps_before
    assert steps < 20 * 8 / 2


def test_queue_full_answers_429_with_retry_after(tiny_model_dir):
    with running_server(tiny_model_dir, max_batch=1, max_queue=1) as (url, _):
        body = {"model": "tiny", "prompt": "x", "max_tokens": 40, "ignore_eos": True}
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            responses = list(
                pool.map(
                    lambda _: httpx.post(f"{url}/v1/completions", json=body, timeout=120), range(8)
                )
            )
        codes = sorted(r.status_code for r in responses)
        assert 429 in codes and 200 in codes and set(codes) <= {200, 429}
        busy = next(r for r in responses if r.status_code == 429)
        assert busy.headers["retry-after"] == "1" and busy.json()["error"]["code"] == "queue_full"
        assert httpx.get(f"{url}/health").status_code == 200


def test_api_key(tiny_model_dir):
    with running_server(tiny_model_dir, api_key="sesame") as (url, _):
        assert httpx.get(f"{url}/health").status_code == 200
        assert httpx.get(f"{url}/").status_code == 200
        r = httpx.get(f"{url}/v1/models")
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert (
            httpx.get(f"{url}/v1/models", headers={"Authorization": "Bearer wrong"}).status_code
            == 401
        )
        assert httpx.get(f"{url}/metrics").status_code == 401
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="sesame")
        assert client.completions.create(model="tiny", prompt="a", max_tokens=2).choices


def test_client_disconnect_stops_generation(server):
    url, engine = server
    cancelled = engine.stats.finished["cancelled"]
    body = {"model": "tiny", "prompt": "go", "max_tokens": 100, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", f"{url}/v1/completions", json=body) as r:
        lines = r.iter_lines()
        next(lines)
        next(lines)
    deadline = time.monotonic() + 30
    while engine.stats.finished["cancelled"] == cancelled:
        assert time.monotonic() < deadline, "generation did not stop"
        time.sleep(0.02)
    assert engine.active == 0 or engine.stats.finished["cancelled"] > cancelled


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


def test_bench_serve_measures_one_and_many_clients(tiny_model_dir):
    from moekit.bench.serve import bench_serve

    result = bench_serve(tiny_model_dir, clients=4, seconds=1.5, new_tokens=8)
    assert result["one_client"]["tokens"] > 0 and result["many_clients"]["tokens"] > 0
    assert result["many_clients"]["clients"] == 4
    assert result["speedup"] == pytest.approx(
        result["many_clients"]["tokens_per_s"] / result["one_client"]["tokens_per_s"]
    )
    assert result["mean_decode_batch"] > 1  # the clients' requests shared decode steps
