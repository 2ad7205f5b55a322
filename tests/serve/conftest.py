import contextlib
import threading
import time

import httpx
import pytest

pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")


@contextlib.contextmanager
def running_server(model_dir, **options):
    """The real app on a free loopback port, served by uvicorn in a background thread."""
    from moekit.serve.app import build

    app, engine = build(model_dir, model_name="tiny", **options)
    engine.start()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
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


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    with running_server(tiny_model_dir, max_batch=8, max_queue=64, max_tokens_limit=100) as s:
        yield s
