import contextlib
import shutil
import threading
import time

import httpx
import pytest

pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")


@contextlib.contextmanager
def running_server(model_dir, *, limits=None, **options):
    """The real app on a free loopback port, served by uvicorn in a background thread as
    `moekit serve` serves it (with the connection `limits` given, else the defaults)."""
    from moekit.serve import build
    from moekit.serve.server import http_server

    app, engine = build(model_dir, model_name="tiny", **options)
    engine.start()
    server = http_server(app, "127.0.0.1", 0, limits)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not (server.started and server.servers):
        assert time.monotonic() < deadline, "the server did not start"
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    while httpx.get(f"{url}/health").status_code != 200:  # poll until it answers
        assert time.monotonic() < deadline
    try:
        yield url, engine
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        engine.stop()


@contextlib.contextmanager
def serve_command(model_dir, *flags, start_timeout=60):
    """`moekit serve MODEL_DIR FLAGS` in a process of its own on a free loopback port, polled
    until /health answers: yields (url, process), the process's stderr piped. Killed at the
    end if it is still running."""
    import socket
    import subprocess
    import sys

    with socket.socket() as probe:  # a port that was free a moment ago
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "moekit.cli", "serve", str(model_dir), "--port", str(port)]
    server = subprocess.Popen([*command, *flags], stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + start_timeout
        while True:  # poll until it answers
            assert server.poll() is None, server.stderr.read() if server.stderr else ""
            assert time.monotonic() < deadline, "the server did not start"
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.05)
        yield url, server
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    with running_server(tiny_model_dir, max_batch=8, max_queue=64, max_tokens_limit=100) as s:
        yield s


def _copy_tokenizer(src, out):
    for name in ("tokenizer.json", "tokenizer_config.json"):
        if (src / name).exists():
            shutil.copy(src / name, out / name)


@pytest.fixture(scope="session")
def long_model_dir(tiny_model_dir, tmp_path_factory):
    """The tiny model's tokenizer with a random model of an 8192-token context: long enough to
    keep a generation running while a test watches it, and longer than the default
    --max-context (4096)."""
    from moekit import build_model
    from moekit.config import ModelConfig
    from moekit.model_dir import save_model

    out = tmp_path_factory.mktemp("long-model")
    cfg = ModelConfig.from_dict(
        dict(vocab_size=512, dim=32, num_layers=2, num_heads=2, num_kv_heads=1, ffn_hidden=64,
             max_seq_len=8192, moe=dict(num_experts=4, top_k=2, expert_hidden=32))
    )  # fmt: skip
    save_model(build_model(cfg, seed=0), cfg, out)
    _copy_tokenizer(tiny_model_dir, out)
    return out


SCORING_PROMPT = "The cat sat"


@pytest.fixture(scope="session")
def eos_model_dir(tiny_model_dir, tmp_path_factory):
    """The tiny model, changed so that its greedy next token after SCORING_PROMPT is
    end-of-text: the end-of-text output row becomes twice the row of the token it would have
    chosen, so its logit is twice the (positive) largest one."""
    import torch

    from moekit.config import ModelConfig
    from moekit.data.tokenizer import Tokenizer
    from moekit.model_dir import load_model, save_model

    model = load_model(tiny_model_dir).eval()
    tokenizer = Tokenizer.load(tiny_model_dir)
    ids = tokenizer.encode(SCORING_PROMPT)
    with torch.no_grad():
        logits = model(torch.tensor([ids]), causal_routing=True).logits[0, -1]
        best = int(logits.argmax())
        assert float(logits[best]) > 0 and best != tokenizer.eos_id
        head = model.lm_head.weight if model.lm_head is not None else model.embed.weight
        head[tokenizer.eos_id] = 2 * head[best]
    out = tmp_path_factory.mktemp("eos-model")
    save_model(model, ModelConfig.load(tiny_model_dir), out)
    _copy_tokenizer(tiny_model_dir, out)
    return out


@pytest.fixture(scope="module")
def client(server):
    """The official openai client, pointed at `server`."""
    openai = pytest.importorskip("openai")
    url, _ = server
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused")


@pytest.fixture(scope="module")
def reference(tiny_model_dir):
    """The library's generator on the tiny model: what the server must answer."""
    from moekit.infer.generate import Generator

    return Generator.from_dir(tiny_model_dir)


def greedy(reference, prompt, n):
    from moekit.infer.sampling import SamplingParams

    return reference.generate(prompt, SamplingParams(temperature=0, max_new_tokens=n))[0].text


@pytest.fixture(scope="module")
def long_server(long_model_dir):
    with running_server(long_model_dir, max_batch=4) as s:
        yield s
