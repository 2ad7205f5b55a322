"""Settings are checked when the server starts, not on every request: a setting that cannot
work, or a chat template that cannot render a conversation, stops `build` (and `moekit serve`,
with exit code 2 and one line naming the flag or the file) before the model loads."""

import json
import shutil
import time

import pytest

from moekit.serve.config import ConnectionLimits, ServerConfig, SettingError


@pytest.mark.parametrize(
    "setting, value",
    [("max_tokens_limit", 0), ("max_tokens_limit", -1), ("max_tokens_limit", 2.5),
     ("max_batch", 0), ("max_queue", -3), ("max_context", 0), ("prefill_chunk", -1)],
)  # fmt: skip
def test_build_refuses_a_setting_that_cannot_work(tiny_model_dir, setting, value):
    from moekit.serve import build

    with pytest.raises(SettingError, match=f"{setting}={value!r} is invalid") as caught:
        build(tiny_model_dir, **{setting: value})
    assert caught.value.setting == setting


def test_connection_limits_and_config_are_checked_when_made():
    for setting, value in [("header_timeout_s", 0), ("body_timeout_s", -1.0),
                           ("max_connections", 0), ("header_timeout_s", True)]:  # fmt: skip
        with pytest.raises(SettingError, match=setting):
            ConnectionLimits(**{setting: value})
    with pytest.raises(SettingError, match="max_body_bytes"):
        ServerConfig("tiny", max_body_bytes=0)
    assert ServerConfig("tiny", max_tokens_limit=None).max_tokens_limit is None


def test_the_command_line_names_the_flag_and_exits_2(tiny_model_dir, capsys):
    from moekit.cli.commands import main

    for flags, named in [(["--max-tokens", "0"], "--max-tokens"),
                         (["--max-tokens", "-1"], "--max-tokens"),
                         (["--header-timeout", "0"], "--header-timeout"),
                         (["--max-connections", "0"], "--max-connections"),
                         (["--prefill-chunk", "-1"], "--prefill-chunk"),
                         (["--shutdown-grace", "-1"], "--shutdown-grace"),
                         (["--allowed-origins", "example.com"], "--allowed-origins")]:  # fmt: skip
        t0 = time.monotonic()
        assert main(["serve", str(tiny_model_dir), "--port", "0", *flags]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and named in err and "is invalid" in err, err
        assert time.monotonic() - t0 < 10


@pytest.fixture
def broken_template_dir(tiny_model_dir, tmp_path):
    """The tiny model with a chat template whose user turn has a placeholder the server
    cannot fill."""
    out = tmp_path / "model"
    shutil.copytree(tiny_model_dir, out)
    template = {"turn": {"system": "<|system|>\n{content}\n", "user": "<|{role}|>\n{content}\n",
                         "assistant": "<|assistant|>\n{content}\n"},
                "generation_prompt": "<|assistant|>\n"}  # fmt: skip
    (out / "chat_template.json").write_text(json.dumps(template))
    return out


def test_a_broken_chat_template_fails_at_start_naming_file_and_placeholder(
    broken_template_dir, capsys
):
    from moekit.cli.commands import main
    from moekit.serve import build

    with pytest.raises(ValueError, match=r"chat_template\.json.*'user' turn.*\{role\}"):
        build(broken_template_dir)
    assert main(["serve", str(broken_template_dir), "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert "chat_template.json" in err and "{role}" in err
