"""`moekit serve` as a user runs it: a separate process."""

import signal
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from .conftest import serve_command


def test_serve_exits_with_a_clear_message_when_the_port_is_taken(tiny_model_dir):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run(
            [sys.executable, "-m", "moekit.cli", "serve", str(tiny_model_dir), "--port", str(port)],
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert done.returncode != 0
    assert f"port {port} on 127.0.0.1 is in use" in done.stderr


@pytest.mark.slow
def test_serve_answers_and_stops_cleanly_on_sigterm(tiny_model_dir):
    with serve_command(tiny_model_dir) as (url, server):
        body = {"model": Path(tiny_model_dir).name, "prompt": "a", "max_tokens": 3}
        assert httpx.post(f"{url}/v1/completions", json=body, timeout=30).status_code == 200
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=30) == 0
