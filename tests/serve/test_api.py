"""The server, driven by the official openai client and by raw HTTP."""

import concurrent.futures
import json
import socket
import time

import httpx
import pytest

from moekit.infer.generate import Generator
from moekit.infer.sampling import SamplingParams

from .conftest import SCORING_PROMPT, running_server

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
    params = SamplingParams(temperature=0, max_new_tokens=12)
    expected = reference.generate("def add(a, b):", params)[0]
    assert out.choices[0].text == expected.text
    assert out.choices[0].finish_reason == expected.finish_reason
    # Usage counts every token the model chose: the library's ids, plus the end-of-text token
    # when that is what stopped it (the library does not return that one).
    stopped_by_eos = expected.finish_reason == "stop"
    assert out.usage.completion_tokens == len(expected.token_ids) + stopped_by_eos
    assert out.usage.prompt_tokens == len(reference.tokenizer.encode("def add(a, b):"))


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
                                                 "ignore_eos": True, "moekit": {"routing": True, "top_k": 1}})  # fmt: skip
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
        (json.dumps({"model": "tiny", "prompt": "a", "stop": list("abcdefghijklmnopq")}).encode(), 400, "at most 16"),
        (b"{" + b" " * (1 << 20) + b"}", 413, "larger than"),
        (json.dumps({"model": "tiny", "prompt": "a", "seed": 2**64}).encode(), 400, "'seed'"),
        (json.dumps({"model": "tiny", "prompt": "a", "seed": -1}).encode(), 400, "'seed'"),
        (json.dumps({"model": "tiny", "prompt": "a", "seed": 2**63 - 1, "n": 2}).encode(), 400, "seed + n - 1"),
        (json.dumps({"model": "tiny", "prompt": "a", "logit_bias": {"5": 10}}).encode(), 400, "'logit_bias'"),
        (json.dumps({"model": "tiny", "prompt": "a", "response_format": {"type": "json_object"}}).encode(), 400, "'response_format'"),
        (json.dumps({"model": "tiny", "prompt": "a", "max_tokens": True}).encode(), 400, "'max_tokens'"),
        (json.dumps({"model": "tiny", "prompt": "a", "n": True}).encode(), 400, "'n'"),
        (json.dumps({"model": "tiny", "prompt": [True, False]}).encode(), 400, "'prompt'"),
        (json.dumps({"model": "tiny", "prompt": "a", "temperature": "0.5"}).encode(), 400, "'temperature'"),
        (b'{"model": "tiny", "prompt": "a\\ud800b"}', 400, "surrogate"),
        (b'{"model": "tiny", "prompt": "a", "stop": ["\\udc00"]}', 400, "'stop'"),
        (json.dumps({"model": "tiny", "prompt": "a", "stop_token_ids": [512]}).encode(), 400, "stop_token_ids"),
    ],
    ids=["malformed", "not-object", "missing", "wrong-type", "unknown-model", "max-tokens-0",
         "max-tokens-limit", "temperature", "penalty", "token-id", "too-long", "stops", "oversize",
         "seed-too-big", "seed-negative", "seed-plus-n", "logit-bias", "response-format",
         "max-tokens-bool", "n-bool", "prompt-bools", "temperature-string", "surrogate",
         "surrogate-stop", "stop-token-id"],
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


@pytest.fixture(scope="module")
def busy_server(tiny_model_dir):
    with running_server(tiny_model_dir, max_batch=1, max_queue=1) as s:
        yield s


def test_queue_full_answers_429_with_retry_after(busy_server):
    url, _ = busy_server
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


def test_a_request_bigger_than_the_queue_is_a_400_not_a_429(busy_server):
    url, _ = busy_server
    for body in ({"n": 2}, {"prompt": ["a", "b"]}):
        r = httpx.post(f"{url}/v1/completions", json={"model": "tiny", "prompt": "a", **body})
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert "queues at most 1" in error["message"] and "--max-queue" in error["message"]
        assert error["param"] == ("n" if "n" in body else "prompt")
    r = httpx.post(
        f"{url}/v1/chat/completions",
        json={"model": "tiny", "messages": [{"role": "user", "content": "a"}], "n": 2},
    )
    assert r.status_code == 400 and r.json()["error"]["param"] == "n"


def test_api_key_guards_every_endpoint_but_health(tiny_model_dir):
    with running_server(tiny_model_dir, api_key="sesame") as (url, _):
        assert httpx.get(f"{url}/health").status_code == 200
        for path in ("/", "/static/app.js", "/v1/models", "/metrics", "/v1/moekit/info"):
            r = httpx.get(f"{url}{path}")
            assert r.status_code == 401, path
            assert r.json()["error"]["code"] == "invalid_api_key"
        wrong = {"Authorization": "Bearer wrong"}
        assert httpx.get(f"{url}/v1/models", headers=wrong).status_code == 401
        assert httpx.get(f"{url}/?key=wrong").status_code == 401
        bearer = {"Authorization": "Bearer sesame"}
        assert httpx.get(f"{url}/static/app.js", headers=bearer).status_code == 200
        # A browser opens /?key=KEY; the cookie that sets lets it load the page's files, and
        # is not itself the key.
        with httpx.Client(base_url=url) as browser:
            page = browser.get("/?key=sesame")
            assert page.status_code == 200 and "moekit playground" in page.text
            cookie = page.headers["set-cookie"].lower()
            assert "httponly" in cookie and "samesite=strict" in cookie and "sesame" not in cookie
            assert browser.get("/static/app.js").status_code == 200
            assert browser.get("/").status_code == 200
            assert browser.get("/v1/models").status_code == 401  # the API wants the key itself
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


def test_chat_logprobs_without_top_logprobs(client):
    """`logprobs: true` alone asks for each token's logprob (and no alternatives)."""
    messages = [{"role": "user", "content": "hello"}]
    ask = dict(model="tiny", messages=messages, max_tokens=8, temperature=0, logprobs=True,
               extra_body={"ignore_eos": True})  # fmt: skip
    out = client.chat.completions.create(**ask)
    content = out.choices[0].logprobs.content
    assert len(content) == out.usage.completion_tokens > 0
    assert all(e.top_logprobs == [] and e.logprob <= 0 for e in content)
    # `bytes` are each token's own UTF-8 bytes: together they spell the message, even where a
    # token holds part of a character (its text alone is U+FFFD).
    spelled = b"".join(bytes(e.bytes) for e in content).decode("utf-8", "replace")
    assert spelled.startswith(out.choices[0].message.content)
    streamed = [
        e
        for chunk in client.chat.completions.create(**ask, stream=True)
        if chunk.choices and chunk.choices[0].logprobs
        for e in chunk.choices[0].logprobs.content
    ]
    assert [e.token for e in streamed] == [e.token for e in content]
    assert [e.logprob for e in streamed] == pytest.approx([e.logprob for e in content])
    assert all(e.top_logprobs == [] for e in streamed)


def test_chat_top_logprobs_need_logprobs(server):
    url, _ = server
    messages = [{"role": "user", "content": "hello"}]
    r = httpx.post(f"{url}/v1/chat/completions",
                   json={"model": "tiny", "messages": messages, "top_logprobs": 2})  # fmt: skip
    assert r.status_code == 400 and r.json()["error"]["param"] == "top_logprobs"


def test_explicit_null_means_the_default(server):
    url, _ = server
    nulls = dict.fromkeys(["temperature", "top_p", "n", "max_tokens", "stop", "seed", "stream",
                           "stream_options", "logprobs", "echo", "presence_penalty", "best_of",
                           "suffix", "top_k", "min_p", "logit_bias", "moekit"])  # fmt: skip
    body = {"model": "tiny", "prompt": "The", "ignore_eos": True, **nulls}
    r = httpx.post(f"{url}/v1/completions", json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    assert len(out["choices"]) == 1 and out["choices"][0]["logprobs"] is None
    assert out["usage"]["completion_tokens"] == 16  # the default max_tokens
    chat = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3,
            **dict.fromkeys(["temperature", "n", "logprobs", "top_logprobs", "seed", "stop",
                             "max_completion_tokens", "tools", "response_format"])}  # fmt: skip
    r = httpx.post(f"{url}/v1/chat/completions", json=chat)
    assert r.status_code == 200, r.text


def test_up_to_16_stop_sequences(server):
    url, _ = server
    stops = [f"<stop {i}>" for i in range(16)]
    body = {"model": "tiny", "prompt": "The", "max_tokens": 3, "stop": stops}
    assert httpx.post(f"{url}/v1/completions", json=body).status_code == 200


def test_unknown_api_paths_share_one_metrics_label(server):
    url, _ = server
    for i in range(3):
        assert httpx.get(f"{url}/v1/no/such/path/{i}").status_code == 404
    text = httpx.get(f"{url}/metrics").text
    assert "/v1/no/such/path" not in text
    assert 'moekit_requests_total{endpoint="other",status="404"}' in text


def test_text_offsets_are_offsets_into_the_text(server):
    """Streamed or not, `text_offset[j]` is where token j's text starts in the choice's text
    (with echo, the prompt's text comes first)."""
    url, _ = server
    body = {"model": "tiny", "prompt": "The cat sat on", "max_tokens": 10, "temperature": 0,
            "echo": True, "logprobs": 1, "ignore_eos": True}  # fmt: skip
    whole = httpx.post(f"{url}/v1/completions", json=body).json()["choices"][0]
    text, lp = whole["text"], whole["logprobs"]
    assert lp["text_offset"] == sorted(lp["text_offset"]) and lp["text_offset"][0] == 0
    prompt_tokens = len(lp["tokens"]) - 10
    for token, offset in zip(lp["tokens"], lp["text_offset"], strict=True):
        # A token that holds part of a character has no text of its own (it shows as U+FFFD);
        # it gets the offset of the text it turns out to belong to.
        if "\ufffd" not in token:
            assert text[offset:].lstrip("\ufffd").startswith(token), (token, offset, text)
    assert lp["text_offset"][prompt_tokens] == len("The cat sat on")
    streamed: dict[str, list] = {"tokens": [], "text_offset": [], "token_logprobs": []}
    streamed_text = ""
    with httpx.stream("POST", f"{url}/v1/completions", json={**body, "stream": True}) as r:
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            choice = json.loads(line[6:])["choices"][0]
            if choice["logprobs"]:
                for key, values in streamed.items():
                    values += choice["logprobs"][key]
            streamed_text += choice["text"]
    assert streamed_text == text
    assert streamed["tokens"] == lp["tokens"]
    assert streamed["text_offset"] == lp["text_offset"]
    assert streamed["token_logprobs"][1:] == pytest.approx(lp["token_logprobs"][1:])


def test_scoring_when_the_greedy_next_token_is_end_of_text(eos_model_dir):
    """lm-evaluation-harness scores a prompt with max_tokens=1, echo and logprobs, and drops
    the last entry as the generated token: that entry must exist when the model's choice is
    end-of-text, or the score silently loses the prompt's last token."""
    import torch

    with running_server(eos_model_dir) as (url, _):
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused")
        out = client.completions.create(model="tiny", prompt=SCORING_PROMPT, max_tokens=1,
                                        temperature=0, echo=True, logprobs=1)  # fmt: skip
    reference = Generator.from_dir(eos_model_dir)
    ids = reference.tokenizer.encode(SCORING_PROMPT)
    with torch.no_grad():
        logits = reference.model(torch.tensor([ids]), causal_routing=True).logits[0]
    logp = torch.log_softmax(logits, -1)
    eos = reference.tokenizer.eos_id
    assert int(logp[-1].argmax()) == eos
    choice, lp = out.choices[0], out.choices[0].logprobs
    assert choice.text == SCORING_PROMPT and choice.finish_reason == "stop"
    assert out.usage.completion_tokens == 1
    assert len(lp.tokens) == len(ids) + 1
    assert lp.tokens[-1] == reference.tokenizer.decode([eos])
    assert lp.token_logprobs[-1] == pytest.approx(float(logp[-1, eos]), abs=1e-4)
    assert lp.text_offset[-1] == len(SCORING_PROMPT)
    expected = logp[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]
    assert lp.token_logprobs[1:-1] == pytest.approx(expected.tolist(), abs=1e-4)


@pytest.fixture(scope="module")
def long_server(long_model_dir):
    with running_server(long_model_dir, max_batch=4) as s:
        yield s


def test_a_non_streaming_client_that_leaves_frees_its_slots(long_server):
    url, engine = long_server
    host, port = url.removeprefix("http://").split(":")
    cancelled = engine.stats.finished["cancelled"]
    body = json.dumps({"model": "tiny", "prompt": "go", "max_tokens": 3000, "n": 3,
                       "ignore_eos": True}).encode()  # fmt: skip
    head = f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body)
        deadline = time.monotonic() + 30
        while engine.active < 3:
            assert time.monotonic() < deadline, "the request did not start"
            time.sleep(0.01)
    left = time.monotonic()  # the client closed its connection without reading the answer
    while engine.active or engine.queue_depth:
        assert time.monotonic() - left < 60, "generation did not stop"
        time.sleep(0.01)
    assert engine.stats.finished["cancelled"] - cancelled == 3  # not run to max_tokens
    assert time.monotonic() - left < 3


def test_max_context_bounds_the_cache_and_the_requests(long_server, long_model_dir):
    url, engine = long_server
    info = httpx.get(f"{url}/v1/moekit/info").json()
    assert info["max_seq_len"] == 8192 and info["max_context"] == 4096  # the default cap
    assert engine._cache.k[0].shape[2] == 4096  # KV cache positions per slot
    r = httpx.post(f"{url}/v1/completions",
                   json={"model": "tiny", "prompt": [5] * 4000, "max_tokens": 200})  # fmt: skip
    error = r.json()["error"]
    assert r.status_code == 400 and error["code"] == "context_length_exceeded"
    assert "4096" in error["message"] and "--max-context" in error["message"]
    with running_server(long_model_dir, max_context=64) as (small_url, small):
        assert small._cache.k[0].shape[2] == 64
        too_long = {"model": "tiny", "prompt": [5] * 60, "max_tokens": 10}
        r = httpx.post(f"{small_url}/v1/completions", json=too_long)
        assert r.status_code == 400 and "--max-context" in r.json()["error"]["message"]
        fits = {"model": "tiny", "prompt": [5] * 50, "max_tokens": 10}
        assert httpx.post(f"{small_url}/v1/completions", json=fits).status_code == 200
