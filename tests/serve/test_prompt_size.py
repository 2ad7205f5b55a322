"""Huge prompts: refused by their size when that alone proves they cannot fit, and tokenized
off the event loop otherwise, so that /health and other clients are answered meanwhile."""

import concurrent.futures
import json
import shutil
import threading
import time

import httpx
import pytest

from moekit.data.tokenizer import Tokenizer

from .conftest import running_server

HUGE = ("the quick brown fox jumps over the lazy dog; " * 25_000)[:1_000_000]  # 1 MB


def health_while(url: str, work) -> tuple[float, list]:
    """Run `work()` while polling /health; (the slowest /health answer, work's result)."""
    slowest, done = 0.0, threading.Event()

    def poll() -> None:
        nonlocal slowest
        with httpx.Client(timeout=60) as c:
            while not done.is_set():
                t0 = time.monotonic()
                assert c.get(f"{url}/health").status_code == 200
                slowest = max(slowest, time.monotonic() - t0)
                done.wait(0.01)

    poller = threading.Thread(target=poll)
    poller.start()
    try:
        result = work()
    finally:
        done.set()
        poller.join()
    return slowest, result


def huge_requests(url: str) -> list[tuple[float, httpx.Response]]:
    """Four 1 MB prompts at once (three completions and a chat): (seconds, response) each."""
    bodies = [("completions", {"model": "tiny", "prompt": HUGE, "max_tokens": 1})] * 3
    chat = {"model": "tiny", "messages": [{"role": "user", "content": HUGE}], "max_tokens": 1}
    bodies.append(("chat/completions", chat))

    def post(item):
        path, body = item
        t0 = time.monotonic()
        r = httpx.post(f"{url}/v1/{path}", json=body, timeout=120)
        return time.monotonic() - t0, r

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        return list(pool.map(post, bodies))


def tokenize_seconds(model_dir) -> float:
    """How long tokenizing one of the huge prompts takes, here and now."""
    tokenizer = Tokenizer.load(model_dir)
    t0 = time.perf_counter()
    tokenizer.encode_prompt(HUGE)
    return time.perf_counter() - t0


def assert_too_long(r: httpx.Response) -> None:
    assert r.status_code == 400, r.text[:300]
    error = r.json()["error"]
    assert error["code"] == "context_length_exceeded" and error["param"] in ("prompt", "messages")
    assert "128" in error["message"]


def test_a_prompt_too_long_by_its_size_alone_is_refused_before_tokenizing(server, tiny_model_dir):
    url, _ = server
    tokenize_s = tokenize_seconds(tiny_model_dir)
    slowest, results = health_while(url, lambda: huge_requests(url))
    for _, r in results:
        assert_too_long(r)
        assert "characters" in r.json()["error"]["message"]
    # All four are answered before one of them could have been tokenized, /health meanwhile.
    assert max(s for s, _ in results) < tokenize_s, (results, tokenize_s)
    assert slowest < tokenize_s / 3, (slowest, tokenize_s)


@pytest.fixture(scope="module")
def unbounded_model_dir(tiny_model_dir, tmp_path_factory):
    """The tiny model with a Unicode normalizer (NFC) in front of its tokenizer: it may join
    characters, so a prompt's length bounds its tokens no longer and every prompt must be
    tokenized. (NFC leaves ASCII alone: the model reads the same tokens.)"""
    out = tmp_path_factory.mktemp("nfc-model")
    for f in tiny_model_dir.iterdir():
        shutil.copy(f, out / f.name)
    spec = json.loads((out / "tokenizer.json").read_text())
    spec["normalizer"] = {"type": "NFC"}
    (out / "tokenizer.json").write_text(json.dumps(spec))
    return out


def test_huge_prompts_are_tokenized_while_health_answers(unbounded_model_dir):
    tokenize_s = tokenize_seconds(unbounded_model_dir)
    with running_server(unbounded_model_dir) as (url, _):
        slowest, results = health_while(url, lambda: huge_requests(url))
    for _, r in results:
        assert_too_long(r)  # known only once tokenized
    # Had they been tokenized on the event loop, /health would have waited for at least one
    # whole tokenization; tokenized off it, /health answers sooner, even on a loaded machine.
    assert slowest < tokenize_s, (slowest, tokenize_s, [s for s, _ in results])


@pytest.mark.parametrize(
    "text", ["The cat sat", " leading space", "語 ü €\n\n  x", "<|endoftext|>"]
)
def test_the_server_tokenizes_prompts_as_the_library_does(server, text):
    from moekit.serve.admission import Admission
    from moekit.serve.config import ServerConfig

    _, engine = server
    admission = Admission(engine, ServerConfig(model_name="tiny"))
    assert admission.tokenize(text) == engine.tokenizer.encode_prompt(text)
