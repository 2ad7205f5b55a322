"""The command line as a whole: every command is a module with `add_parser` and `run`, has
help, and errors come back as exit codes with one line that names the problem."""

import importlib

import pytest
import torch

from moekit.cli import main
from moekit.cli.commands import COMMANDS, build_parser, module_of
from moekit.version import __version__

from .conftest import run


def test_every_command_is_a_module_with_add_parser_and_run():
    for name in COMMANDS:
        module = importlib.import_module(module_of(name))
        assert callable(module.add_parser), name
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert list(sub.choices) == list(COMMANDS)
    for name, command in sub.choices.items():
        assert command.description or name == "bench", f"{name} has no description"


@pytest.mark.parametrize(
    "argv",
    [[c] for c in COMMANDS if c != "bench"]
    + [["bench", b] for b in ("layer", "generate", "serve", "upcycle", "train")],
)
def test_every_command_has_help(argv, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([*argv, "--help"])
    assert exit_.value.code == 0
    assert "usage: moekit" in capsys.readouterr().out


def test_version_and_no_command(capsys):
    with pytest.raises(SystemExit):
        main(["--version"])
    assert capsys.readouterr().out.strip() == f"moekit {__version__}"
    assert main([]) == 2


def test_python_dash_m_moekit_runs_the_command_line():
    proc = run("info", "debug", "--json")
    assert '"total_params"' in proc.stdout


def test_unknown_arguments_are_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["info", "debug", "--nope"])
    assert exit_.value.code == 2
    assert "unrecognized arguments: --nope" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
@pytest.mark.parametrize("command", ["generate", "chat", "analyze", "doctor"])
def test_a_device_the_machine_lacks_is_a_clear_error(command, tiny_model_dir, tmp_path, capsys):
    argv = {
        "generate": ["generate", str(tiny_model_dir), "def", "--device", "cuda"],
        "chat": ["chat", str(tiny_model_dir), "--device", "cuda"],
        "analyze": [
            "analyze",
            str(tiny_model_dir),
            "--out",
            str(tmp_path / "a"),
            "--quiet",
            "--device",
            "cuda",
        ],
        "doctor": ["doctor", str(tiny_model_dir), "--tokens", "64", "--device", "cuda"],
    }[command]
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert "CUDA is not available" in err and err.count("\n") == 1


def test_the_device_flag_accepts_auto_and_cpu(tiny_model_dir, capsys):
    for device in ("auto", "cpu"):
        assert main(["generate", str(tiny_model_dir), "def", "--max-new-tokens", "2",
                     "--temperature", "0", "--json", "--device", device]) == 0  # fmt: skip
        assert '"token_ids"' in capsys.readouterr().out
