"""`moekit plan`: the split table, its JSON, the config forms it reads, and its errors."""

import json
import re
import subprocess
import sys
from pathlib import Path

from moekit.cli import main
from moekit.parallel.plan import plan_parallel
from moekit.params import count_params
from moekit.presets import get_preset

from .conftest import run


def test_plan_json_for_a_preset():
    data = json.loads(run("plan", "debug", "--gpus", "8", "--json").stdout)
    assert data["name"] == "debug" and data["gpus"] == 8
    assert data["gpu_memory"] == 80 * 2**30  # the default
    assert [row["ep"] for row in data["splits"]] == [1, 2, 4, 8]
    assert data["recommended"]["fits"]
    assert data == {"name": "debug", **plan_parallel(get_preset("debug"), gpus=8).to_dict()}


def test_plan_table_names_the_splits_and_what_is_estimated(capsys):
    assert main(["plan", "debug", "--gpus", "4", "--gpu-memory", "1GiB"]) == 0
    out = capsys.readouterr().out
    for needle in ("debug on 4 devices of 1.0 GiB", "all-to-all", "collectives", "optimizer",
                   "activations", "recommended: DP=", "estimates from the config alone",
                   "pipeline and tensor parallelism", "fragmentation", "yes *"):  # fmt: skip
        assert needle in out, needle


def test_plan_passes_its_flags(capsys):
    argv = ["plan", "debug", "--gpus", "4", "--ep", "2", "--tokens-per-step", "100",
            "--sharding", "ddp", "--activation-checkpointing", "--param-dtype", "fp32",
            "--grad-dtype", "fp32", "--gpu-memory", "2GB", "--json"]  # fmt: skip
    assert main(argv) == 0
    data = json.loads(capsys.readouterr().out)
    expected = plan_parallel(get_preset("debug"), gpus=4, ep=2, tokens_per_step=100,
                             sharding="ddp", activation_checkpointing=True, param_dtype="fp32",
                             grad_dtype="fp32", gpu_memory=2 * 10**9)  # fmt: skip
    assert data["splits"] == [s.to_dict() for s in expected.splits]
    assert main(["plan", "debug", "--gpus", "1", "--no-master-weights", "--json"]) == 0
    row = json.loads(capsys.readouterr().out)["splits"][0]
    assert row["optimizer"] == 8 * count_params(get_preset("debug")).total  # moments only


def test_plan_reads_a_model_directory_and_a_config_file(tmp_path, capsys):
    cfg = get_preset("tiny")
    cfg.save(tmp_path / "config.json")
    for target in (tmp_path, tmp_path / "config.json"):
        assert main(["plan", str(target), "--gpus", "2", "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["splits"] == [
            s.to_dict() for s in plan_parallel(cfg, gpus=2).splits
        ]


def test_plan_errors_are_one_line(capsys):
    for argv, message in (
        (["--gpus", "0"], "gpus=0 is invalid"),
        (["--gpus", "4", "--gpu-memory", "lots"], "'lots' is not a memory size"),
        (["--gpus", "4", "--ep", "3"], "ep=3 is invalid"),
        (["--gpus", "4", "--tokens-per-step", "0"], "tokens_per_step=0 is invalid"),
    ):
        assert main(["plan", "debug", *argv]) == 2
        err = capsys.readouterr().err
        assert err.startswith("moekit plan: error:") and message in err
        assert "Traceback" not in err
    proc = run("plan", "no-such-model", "--gpus", "2", check=False)
    assert proc.returncode == 2 and "neither a preset nor" in proc.stderr


def test_plan_does_not_import_torch():
    code = (
        "import sys, contextlib, io\n"
        "from moekit.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        "    assert main(['plan', 'deepseek-v3', '--gpus', '256']) == 0\n"
        "print('torch' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_the_worked_plan_in_the_docs_is_the_real_output(capsys):
    # docs/scaling.md pastes two runs of `moekit plan`; they must stay what the command prints.
    doc = (Path(__file__).parents[2] / "docs" / "scaling.md").read_text()
    blocks = re.findall(r"```\n\$ moekit (plan [^\n]*)\n(.*?)```", doc, flags=re.S)
    assert len(blocks) == 2
    for command, pasted in blocks:
        assert main(command.split()) == 0
        printed = "\n".join(line.rstrip() for line in capsys.readouterr().out.splitlines())
        assert printed + "\n" == pasted, command
