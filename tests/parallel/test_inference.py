"""Generation with the experts split over processes (`moekit generate --ep N` under torchrun)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from moekit.infer.generate import Generator
from moekit.infer.sampling import SamplingParams
from tests.parallel import workers
from tests.parallel.launch import run_world


@pytest.mark.parametrize("world", [2, 4])
def test_split_generation_equals_one_process(tiny_model_dir, tmp_path, world):
    out = tmp_path / "split.json"
    run_world(workers.split_generation, world, str(tiny_model_dir), str(out))
    split = json.loads(out.read_text())
    whole = Generator.from_dir(tiny_model_dir)
    prompts = ["The cat", "def f(x):\n    return"]
    for name, params in {
        "greedy": SamplingParams(temperature=0, max_new_tokens=12),
        "sampled": SamplingParams(temperature=1.0, top_k=20, max_new_tokens=12, seed=5),
    }.items():
        for row, done in zip(split[name], whole.generate(prompts, params), strict=True):
            assert [t for t, _ in row] == [t.id for t in done.tokens], name
            assert [lp for _, lp in row] == pytest.approx(
                [t.logprob for t in done.tokens], abs=1e-4
            )


def test_generate_ep_under_torchrun_prints_once(tiny_model_dir):
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
        "-m", "moekit", "generate", str(tiny_model_dir), "The cat", "--temperature", "0",
        "--max-new-tokens", "8", "--json", "--ep", "2",
    ]  # fmt: skip
    run = subprocess.run(command, capture_output=True, text=True, timeout=240, check=False)
    assert run.returncode == 0, run.stderr[-2000:]
    printed = json.loads(run.stdout)  # one JSON object: only the main process prints
    expected = Generator.from_dir(tiny_model_dir).generate(
        "The cat", SamplingParams(temperature=0, max_new_tokens=8)
    )[0]
    assert printed["token_ids"] == expected.token_ids


def test_generate_ep_without_its_processes_is_refused(tiny_model_dir, capsys):
    from moekit.cli import main

    assert main(["generate", str(tiny_model_dir), "hi", "--ep", "2"]) == 2
    assert "torchrun --nproc-per-node 2 -m moekit generate" in capsys.readouterr().err


def test_serve_ep_under_torchrun_answers_as_one_process(tiny_model_dir):
    import signal
    import time

    import httpx

    from tests.parallel.launch import free_port

    port = free_port()
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
        "-m", "moekit", "serve", str(tiny_model_dir), "--port", str(port), "--ep", "2",
    ]  # fmt: skip
    server = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 180
        while True:
            try:
                httpx.get(f"{url}/v1/models", timeout=2)
                break
            except httpx.TransportError:
                assert server.poll() is None, server.communicate()[1][-2000:]
                assert time.monotonic() < deadline, "the server did not start"
                time.sleep(0.5)
        body = {"model": tiny_model_dir.name, "prompt": "The cat", "max_tokens": 8, "temperature": 0,
                "logprobs": 1}  # fmt: skip
        answers = [httpx.post(f"{url}/v1/completions", json=body, timeout=60) for _ in range(2)]
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
    expected = Generator.from_dir(tiny_model_dir).generate(
        "The cat", SamplingParams(temperature=0, max_new_tokens=8)
    )[0]
    for answer in answers:
        assert answer.status_code == 200, answer.text
        assert answer.json()["choices"][0]["text"] == expected.text
    assert server.returncode is not None  # every process ended
