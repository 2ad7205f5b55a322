"""`moekit finetune` end to end: the trainer's machinery with fine-tuning data and methods."""

import json

import pytest
import torch

from moekit.cli import main
from moekit.finetune.lora import load_adapter
from moekit.model_dir import load_model, load_weights
from moekit.training.config import finetune_run_config
from moekit.training.trainer import train

from .conftest import FAST


def run_cli(capsys, *args):
    code = main(list(map(str, args)))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_lora_finetune_writes_a_model_and_its_adapter(tmp_path, tiny_model_dir, sft_file, capsys):
    out = tmp_path / "ft"
    code, stdout, err = run_cli(capsys, "finetune", tiny_model_dir, "--data", sft_file,
                                "--out", out, "--lora-rank", "4", *FAST, "--json")  # fmt: skip
    assert code == 0, err
    figures = json.loads(stdout)
    assert figures["method"] == "lora" and figures["steps"] == 6
    assert 0 < figures["trainable_params"] < 0.2 * figures["total_params"]
    assert "trainable of" in err and "training and" in err  # progress names both figures
    for name in ("config.json", "model.safetensors", "tokenizer.json", "chat_template.json",
                 "finetune.json", "adapter/adapter.safetensors", "adapter/adapter_config.json",
                 "report/report.html"):  # fmt: skip
        assert (out / name).is_file(), name
    assert "fine-tuning" in (out / "report" / "report.html").read_text()
    # The directory's weights are base + adapter merged: the same logits as the base model with
    # the adapter loaded, and different from the base alone.
    tokens = torch.randint(0, 512, (2, 16))
    merged = load_model(out).eval()
    adapted = load_model(tiny_model_dir).eval()
    load_adapter(adapted, out / "adapter")
    base = load_model(tiny_model_dir).eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(tokens).logits, adapted(tokens).logits,
                                   rtol=1e-4, atol=1e-4)  # fmt: skip
        assert (merged(tokens).logits - base(tokens).logits).abs().max() > 1e-3
    # Non-adapted weights are the base's, bit for bit.
    tuned, original = load_weights(out), load_weights(tiny_model_dir)
    assert torch.equal(tuned["embed.weight"], original["embed.weight"])
    assert torch.equal(tuned["layers.0.ffn.router.weight"], original["layers.0.ffn.router.weight"])
    # `moekit info` reports what was trained.
    code, stdout, _ = run_cli(capsys, "info", out, "--json")
    info = json.loads(stdout)["finetune"]
    assert info["method"] == "lora" and info["trainable_params"] == figures["trainable_params"]


def test_resumed_finetune_equals_an_uninterrupted_one(tmp_path, tiny_model_dir, sft_file, capsys):
    straight = finetune_run_config(tiny_model_dir, sft_file, overrides=FAST)
    train(straight, tmp_path / "straight", verbose=False)
    train(straight, tmp_path / "resumed", verbose=False, stop_after=3)
    code, _, err = run_cli(capsys, "finetune", "--resume", "--out", tmp_path / "resumed", "--quiet")
    assert code == 0, err
    a, b = load_weights(tmp_path / "straight"), load_weights(tmp_path / "resumed")
    for key in a:
        assert torch.equal(a[key], b[key]), key
    lines = [
        json.loads(x) for x in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()
    ]
    assert [r["step"] for r in lines if "loss" in r] == list(range(1, 7))


def test_full_finetune_and_bad_input(tmp_path, tiny_model_dir, sft_file, capsys):
    code, stdout, err = run_cli(capsys, "finetune", tiny_model_dir, "--data", sft_file, "--out",
                                tmp_path / "full", "--method", "full", *FAST,
                                "train.max_steps=2", "--json")  # fmt: skip
    assert code == 0, err
    figures = json.loads(stdout)
    assert figures["trainable_params"] == figures["total_params"]
    code, _, err = run_cli(capsys, "finetune", tmp_path / "nowhere", "--data", sft_file,
                           "--out", tmp_path / "x")  # fmt: skip
    assert code == 2 and "is not a model directory" in err and "nowhere" in err
    code, _, err = run_cli(capsys, "finetune", tiny_model_dir, "--out", tmp_path / "x")
    assert code == 2 and "--data" in err
    code, _, err = run_cli(
        capsys, "finetune", "--resume", tiny_model_dir, "--out", tmp_path / "full"
    )
    assert code == 2 and "do not pass BASE_DIR" in err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": 3}\n')
    code, _, err = run_cli(
        capsys, "finetune", tiny_model_dir, "--data", bad, "--out", tmp_path / "y"
    )
    assert code == 2 and "bad.jsonl:2" in err
    assert not (tmp_path / "y" / "train_state").exists()
    code, _, err = run_cli(capsys, "finetune", tiny_model_dir, "--data", sft_file, "--out",
                           tmp_path / "z", "--lora-targets", "*.nothing")  # fmt: skip
    assert code == 2 and "match no weight" in err


@pytest.mark.parametrize("section", ["model"])
def test_a_finetune_config_cannot_change_the_model(tmp_path, tiny_model_dir, sft_file, section):
    config = tmp_path / "ft.yaml"
    config.write_text(f"{section}:\n  dim: 16\n")
    with pytest.raises(ValueError, match="cannot change the model"):
        finetune_run_config(tiny_model_dir, sft_file, config_file=config)


def test_the_base_and_other_models_are_never_overwritten(tmp_path, tiny_model_dir, sft_file,
                                                          capsys):  # fmt: skip
    import shutil

    base = tmp_path / "base"
    shutil.copytree(tiny_model_dir, base)
    before = (base / "model.safetensors").read_bytes()
    code, _, err = run_cli(capsys, "finetune", base, "--data", sft_file, "--out", base, *FAST)
    assert code == 2 and "already holds a model" in err
    assert (base / "model.safetensors").read_bytes() == before
    assert not (base / "train_state").exists() and not (base / "adapter").exists()


def test_without_validation_examples_no_evaluation_runs(tmp_path, tiny_model_dir, sft_file):
    cfg = finetune_run_config(tiny_model_dir, sft_file,
                              overrides=[*FAST, "finetune.val_fraction=0"])  # fmt: skip
    result = train(cfg, tmp_path / "run", verbose=False)
    assert result.val_loss is None
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert not [r for r in records if r["kind"] == "eval"]


def test_a_resumed_esft_run_keeps_its_selection_and_shares(tmp_path, tiny_model_dir, sft_file):
    cfg = finetune_run_config(tiny_model_dir, sft_file, method="esft", overrides=FAST)
    train(cfg, tmp_path / "run", verbose=False, stop_after=3)
    first = json.loads((tmp_path / "run" / "finetune.json").read_text())
    train(cfg, tmp_path / "run", verbose=False, resume=True)
    again = json.loads((tmp_path / "run" / "finetune.json").read_text())
    assert again["esft_experts"] == first["esft_experts"]
    assert again["esft_routing_share"] == first["esft_routing_share"]
