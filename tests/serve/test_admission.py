"""Admission: the queue, the context and the limits a request is checked against."""

import concurrent.futures

import httpx
import pytest

from .conftest import running_server


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
        assert "queues at most 1" in error["message"] and "max_queue" in error["message"]
        assert error["param"] == ("n" if "n" in body else "prompt")
    r = httpx.post(
        f"{url}/v1/chat/completions",
        json={"model": "tiny", "messages": [{"role": "user", "content": "a"}], "n": 2},
    )
    assert r.status_code == 400 and r.json()["error"]["param"] == "n"


def test_max_context_bounds_the_cache_and_the_requests(long_server, long_model_dir):
    url, engine = long_server
    info = httpx.get(f"{url}/v1/moekit/info").json()
    assert info["max_seq_len"] == 8192 and info["max_context"] == 4096  # the default cap
    assert engine._cache.k[0].shape[2] == 4096  # KV cache positions per slot
    r = httpx.post(f"{url}/v1/completions",
                   json={"model": "tiny", "prompt": [5] * 4000, "max_tokens": 200}, timeout=60)  # fmt: skip
    error = r.json()["error"]
    assert r.status_code == 400 and error["code"] == "context_length_exceeded"
    assert "4096" in error["message"] and "max_context" in error["message"]
    with running_server(long_model_dir, max_context=64) as (small_url, small):
        assert small._cache.k[0].shape[2] == 64
        too_long = {"model": "tiny", "prompt": [5] * 60, "max_tokens": 10}
        r = httpx.post(f"{small_url}/v1/completions", json=too_long, timeout=60)
        assert r.status_code == 400 and "max_context" in r.json()["error"]["message"]
        fits = {"model": "tiny", "prompt": [5] * 50, "max_tokens": 10}
        assert httpx.post(f"{small_url}/v1/completions", json=fits, timeout=60).status_code == 200
