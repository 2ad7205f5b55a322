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
