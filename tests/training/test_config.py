import json

import pytest

from moekit.presets import get_preset
from moekit.training.config import (
    RunConfig,
    TrainConfig,
    apply_overrides,
    read_config_file,
    resolve_run_config,
)


def test_dotted_overrides_reach_any_field():
    cfg = resolve_run_config(
        preset="tiny",
        overrides=[
            "train.max_steps=200",
            "train.batch_size=8",
            "train.seq_len=256",
            "train.eval_every=50",
            "train.save_every=100",
            "train.seed=1",
            "train.lr=3e-4",
            "model.moe.num_experts=16",
            "model.moe.capacity_factor=1.25",
            "model.tie_embeddings=true",
            "data.source=builtin",
            'train.samples=["a", "b"]',
        ],
    )
    assert cfg.train.max_steps == 200 and cfg.train.batch_size == 8 and cfg.train.seq_len == 256
    assert cfg.train.eval_every == 50 and cfg.train.save_every == 100 and cfg.train.seed == 1
    assert cfg.train.lr == pytest.approx(3e-4)
    assert cfg.model.moe.num_experts == 16 and cfg.model.moe.capacity_factor == 1.25
    assert cfg.model.tie_embeddings is True
    assert cfg.train.samples == ["a", "b"]


def test_overrides_can_make_a_model_dense_and_null_a_field():
    cfg = resolve_run_config(preset="tiny", overrides=["model.moe=null"])
    assert cfg.model.moe is None
    cfg = resolve_run_config(preset="tiny", overrides=["model.moe.capacity_factor=none"])
    assert cfg.model.moe.capacity_factor is None


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.max_step=3", r"override train\.max_step: train has no field 'max_step'"),
        ("model.moe.experts=3", r"model\.moe has no field 'experts'"),
        ("optim.lr=1", r"the run config has no field 'optim'"),
        ("train.batch_size=big", r"override train\.batch_size='big'"),
        ("train.lr", r"must look like section\.field=value"),
        ("train.max_steps.x=1", r"train\.max_steps is not a section"),
        ("model.moe.top_k=99", r"MoEConfig\.top_k=99 is invalid"),
        ("train.seq_len=100000", r"TrainConfig\.seq_len=100000 is invalid: must be <= model"),
        ("train.precision=fp8", r"TrainConfig\.precision='fp8' is invalid"),
    ],
)
def test_bad_overrides_are_clear(override, message):
    with pytest.raises(ValueError, match=message):
        resolve_run_config(preset="tiny", overrides=[override])


def test_moe_override_on_a_dense_model_is_explained():
    with pytest.raises(ValueError, match=r"model\.moe is not set"):
        resolve_run_config(preset="tiny", overrides=["model.moe=null", "model.moe.top_k=1"])


def test_yaml_and_json_files(tmp_path):
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text(
        "model:\n  moe:\n    num_experts: 4\ntrain:\n  max_steps: 7\ndata:\n  val_fraction: 0.1\n"
    )
    cfg = resolve_run_config(config_file=yaml_file, preset="tiny", overrides=["train.seed=3"])
    assert cfg.model.moe.num_experts == 4 and cfg.model.dim == 128  # merged over the preset
    assert cfg.train.max_steps == 7 and cfg.train.seed == 3 and cfg.data.val_fraction == 0.1
    json_file = tmp_path / "run.json"
    json_file.write_text(cfg.to_json())
    assert RunConfig.from_dict(read_config_file(json_file)) == cfg


def test_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_config_file(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ValueError, match="could not be parsed"):
        read_config_file(bad)
    (tmp_path / "x.toml").write_text("")
    with pytest.raises(ValueError, match=r"use \.yaml, \.yml or \.json"):
        read_config_file(tmp_path / "x.toml")
    with pytest.raises(ValueError, match="unknown section"):
        RunConfig.from_dict({"model": {}, "optimizer": {}})
    with pytest.raises(ValueError, match="'model' section"):
        resolve_run_config(overrides=["train.max_steps=3"])


def test_round_trip_and_defaults():
    cfg = resolve_run_config(preset="debug")
    assert RunConfig.from_dict(json.loads(cfg.to_json())) == cfg
    assert TrainConfig().precision == "auto"
    assert apply_overrides({"model": {}}, []) == {"model": {}}


def test_init_from_is_refused_in_a_fine_tuning_run(tiny_model_dir):
    from moekit.training.config import finetune_run_config

    with pytest.raises(ValueError, match=r"TrainConfig.init_from=.* starts from finetune.base"):
        finetune_run_config(
            tiny_model_dir, "data.jsonl", overrides=[f"train.init_from={tiny_model_dir}"]
        )


def test_a_config_file_may_be_a_shipped_recipe(tmp_path):
    from moekit.training.config import recipes

    assert "demo" in recipes()
    cfg = resolve_run_config(config_file="demo", overrides=["train.max_steps=3"])
    assert cfg.model == get_preset("demo") and cfg.train.max_steps == 3
    assert cfg.train.samples == ["def ", "The ", "12 + 7 = ", '{"name": ']
    with pytest.raises(FileNotFoundError, match=r"neither a file nor a built-in recipe \(demo"):
        resolve_run_config(config_file="nope")
