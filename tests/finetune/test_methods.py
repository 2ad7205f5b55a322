"""The fine-tuning methods one by one: what each trains, what it saves, what it reads back."""

import json

import pytest
import torch

from moekit import build_model
from moekit.data.tokenizer import Tokenizer
from moekit.finetune import config as finetune_config
from moekit.finetune import esft
from moekit.finetune.methods import (
    METHODS,
    ESFTTuning,
    FinetuneSummary,
    FullTuning,
    LoRATuning,
)
from moekit.training.config import finetune_run_config
from moekit.training.method import TrainingMethod, training_method

from .conftest import FAST


def prepared(tmp_path, base, data, method, *extra, resume=False):
    """A method made for a run in tmp_path/run, its data prepared and a model built for it."""
    cfg = finetune_run_config(base, data, method=method, overrides=[*FAST, *extra])
    chosen = training_method(cfg, tmp_path / "run", resume=resume)
    lines = []
    _, rows = chosen.prepare_data(lines.append)
    model = build_model(cfg.model, seed=0)
    chosen.prepare_model(model, rows)
    return chosen, model, lines


def trainable(model):
    return {name for name, p in model.named_parameters() if p.requires_grad}


def test_every_configurable_method_has_an_implementation():
    assert set(METHODS) == set(finetune_config.METHODS)
    assert (METHODS["lora"], METHODS["full"], METHODS["esft"]) == (
        LoRATuning,
        FullTuning,
        ESFTTuning,
    )


@pytest.mark.parametrize("method", ["lora", "full", "esft"])
def test_the_factory_makes_each_method_a_training_method(tmp_path, tiny_model_dir, sft_file,
                                                         method):  # fmt: skip
    chosen, _, lines = prepared(tmp_path, tiny_model_dir, sft_file, method)
    assert type(chosen) is METHODS[method] and chosen.name == method
    assert isinstance(chosen, TrainingMethod)
    # Padding is the base tokenizer's pad token; the data line names examples and targets.
    assert chosen.pad_id == Tokenizer.load(tiny_model_dir).pad_id
    assert len(lines) == 1 and lines[0].startswith("fine-tuning data: ")
    assert "target tokens" in lines[0]
    assert chosen.summary_line().startswith(f"{method}: ")
    assert chosen.sample_prompts() and all(isinstance(p, str) for p in chosen.sample_prompts())
    # Only full fine-tuning keeps the routers balancing (the others freeze the routers).
    assert chosen.balance_routers is (method == "full")


def test_lora_trains_the_adapters_only(tmp_path, tiny_model_dir, sft_file):
    chosen, model, _ = prepared(tmp_path, tiny_model_dir, sft_file, "lora")
    names = trainable(model)
    assert names and all(".lora." in n or ".adapters." in n for n in names)
    counted = sum(p.numel() for n, p in model.named_parameters() if n in names)
    summary = chosen.finetune_summary()
    assert summary.trainable_params == counted < summary.total_params
    assert chosen.summary_line().endswith(f"in {len(summary.targets)} adapted weights")
    # The model starts as the base model: the adapters' updates start at zero.
    base = build_model(chosen.model_cfg, seed=0)
    base.load_state_dict({k: v for k, v in model.state_dict().items() if k in base.state_dict()})
    tokens = torch.randint(0, 512, (1, 8))
    with torch.no_grad():
        torch.testing.assert_close(model(tokens).logits, base(tokens).logits)


def test_full_finetuning_trains_every_weight(tmp_path, tiny_model_dir, sft_file):
    chosen, model, _ = prepared(tmp_path, tiny_model_dir, sft_file, "full")
    assert trainable(model) == {n for n, _ in model.named_parameters()}
    summary = chosen.finetune_summary()
    assert summary.trainable_params == summary.total_params
    assert summary.targets == ["all"] and summary.esft_experts is None


@pytest.mark.parametrize("attention", [False, True])
def test_esft_trains_the_chosen_experts_only(tmp_path, tiny_model_dir, sft_file, attention):
    chosen, model, _ = prepared(tmp_path, tiny_model_dir, sft_file, "esft",
                                f"finetune.esft_attention={str(attention).lower()}")  # fmt: skip
    experts = {f"layers.{i}.ffn.experts.{w}" for i in (0, 1) for w in ("w_gate", "w_up", "w_down")}
    attn = {n for n, _ in model.named_parameters() if ".attn." in n}
    assert trainable(model) == experts | (attn if attention else set())
    # The stacked weights train in part: the gradient of an unchosen expert is zero.
    model(torch.randint(0, 512, (2, 8))).logits.sum().backward()
    for layer, picked in chosen.selection.items():
        grad = model.get_parameter(f"layers.{layer}.ffn.experts.w_up").grad
        others = [e for e in range(8) if e not in picked]
        assert grad[others].abs().sum() == 0 and grad[picked].abs().sum() > 0
    assert "experts trained: layer 0: " in chosen.summary_line()


@pytest.mark.parametrize(
    ("method", "extra"),
    [("lora", {"adapter/adapter.safetensors", "adapter/adapter_config.json"}),
     ("full", set()), ("esft", set())],
)  # fmt: skip
def test_what_each_method_saves(tmp_path, tiny_model_dir, sft_file, method, extra):
    chosen, model, _ = prepared(tmp_path, tiny_model_dir, sft_file, method)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    chosen.save(model)
    assert {str(p.relative_to(run_dir)) for p in run_dir.rglob("*") if p.is_file()} == {
        "config.json",
        "model.safetensors",
        *extra,
    }
    chosen.write_files()
    written = json.loads((run_dir / "finetune.json").read_text())
    assert written == chosen.finetune_summary().to_dict()
    assert FinetuneSummary.load(run_dir) == chosen.finetune_summary()
    assert written["method"] == method and written["base"] == str(tiny_model_dir)
    assert ("esft_experts" in written) is (method == "esft")
    assert (run_dir / "chat_template.json").is_file()


def test_a_resumed_esft_method_reads_its_choice_back(tmp_path, tiny_model_dir, sft_file,
                                                      monkeypatch):  # fmt: skip
    first, _, _ = prepared(tmp_path, tiny_model_dir, sft_file, "esft")
    (tmp_path / "run").mkdir()
    first.write_files()

    def measured(*args, **kwargs):
        raise AssertionError("a resumed run does not measure the routing again")

    monkeypatch.setattr(esft, "routing_mass", measured)
    again, _, _ = prepared(tmp_path, tiny_model_dir, sft_file, "esft", resume=True)
    assert again.selection == first.selection and again.share == first.share
    assert again.finetune_summary() == first.finetune_summary()


def test_finetune_summary_round_trips_and_omits_what_a_method_lacks():
    summary = FinetuneSummary(method="lora", base="b", trainable_params=3, total_params=10,
                              trainable_fraction=0.3, targets=["x"])  # fmt: skip
    data = summary.to_dict()
    assert "esft_experts" not in data and FinetuneSummary.from_dict(data) == summary
    assert FinetuneSummary.from_dict({**data, "added_later": 1}) == summary
