"""Pre-training as a training method, and the factory that picks a run's method."""

import pytest
import torch

from moekit import build_model
from moekit.model_dir import ModelDir, load_weights
from moekit.training.method import Pretraining, TrainingMethod, training_method


def test_pretraining_is_the_method_without_a_finetune_section(tmp_path, tiny_run_config):
    cfg = tiny_run_config('train.samples=["a", "b"]')
    chosen = training_method(cfg, tmp_path / "run", resume=False)
    assert isinstance(chosen, Pretraining) and isinstance(chosen, TrainingMethod)
    assert chosen.name == "pretrain" and chosen.summary_line() is None
    assert chosen.balance_routers is True and chosen.pad_id is None
    assert chosen.sample_prompts() == ["a", "b"]


def test_pretraining_prepares_data_and_saves_the_model_alone(tmp_path, tiny_run_config):
    cfg = tiny_run_config()
    run_dir = tmp_path / "run"
    chosen = training_method(cfg, run_dir, resume=False)
    lines = []
    tokenizer, data = chosen.prepare_data(lines.append)
    assert lines[0] == "preparing data ..."
    assert lines[1] == (
        f"data: {len(data.train)} training rows, {len(data.val)} validation rows of 32 "
        f"tokens; vocabulary {tokenizer.vocab_size}"
    )
    model = build_model(cfg.model, seed=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    chosen.prepare_model(model, data)  # no init_from: the fresh model as it is
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert all(p.requires_grad for p in model.parameters())
    run_dir.mkdir()
    chosen.save(model)
    chosen.write_files()
    assert sorted(p.name for p in run_dir.iterdir()) == ["config.json", "model.safetensors"]
    assert ModelDir(run_dir).config() == cfg.model


def test_init_from_starts_from_another_directorys_weights(tmp_path, tiny_run_config):
    cfg = tiny_run_config(f"train.init_from={tmp_path / 'source'}")
    source = build_model(cfg.model, seed=1)
    ModelDir(tmp_path / "source").save_model(source, cfg.model)
    chosen = training_method(cfg, tmp_path / "run", resume=False)
    _, data = chosen.prepare_data(lambda line: None)
    model = build_model(cfg.model, seed=0)
    chosen.prepare_model(model, data)
    saved = load_weights(tmp_path / "source")
    assert all(torch.equal(v, saved[k]) for k, v in model.state_dict().items())
    # A resumed run takes its weights from its checkpoint, not from init_from.
    resumed = Pretraining(cfg, tmp_path / "run", resume=True)
    fresh = build_model(cfg.model, seed=0)
    resumed.prepare_model(fresh, data)
    assert not torch.equal(fresh.embed.weight, source.embed.weight)
    # The source must hold the model the run config describes.
    other = tiny_run_config("model.dim=64", f"train.init_from={tmp_path / 'source'}")
    with pytest.raises(ValueError, match=r"train\.init_from: .* holds a different model"):
        Pretraining(other, tmp_path / "x", resume=False).prepare_model(
            build_model(other.model, seed=0), data
        )
