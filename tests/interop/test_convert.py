"""import_hf and export_hf end to end, without transformers: a moekit model exported and
imported again comes back bit for bit (sharded or not, with its tokenizer), dtypes are
converted with routing kept in float32, and what a checkpoint holds that the model cannot is
refused by name before anything is written."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from moekit import build_model
from moekit.data.tokenizer import Tokenizer
from moekit.interop.fields import UnsupportedError
from moekit.interop.hf import ARCHITECTURES, export_hf, import_hf
from moekit.model_dir import ModelDir, load_weights, save_model

from ._configs import VARIANTS, hf_config

ARCHS = {a.name: a for a in ARCHITECTURES}
TEXT = "def add(a, b):\n    return a + b\n" * 20 + "The quick brown fox jumps. " * 20


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.train([TEXT], 280)


def make_model(directory, variant, tokenizer=None):
    """A moekit model directory holding the model of `variant`, every tensor random (buffers
    such as the selection bias included); returns its config."""
    arch = ARCHS[VARIANTS[variant][0]]
    cfg = arch.config_from_hf(hf_config(variant))
    model = build_model(cfg, seed=0)
    with torch.no_grad():
        for t in model.state_dict().values():
            if t.abs().sum() == 0:
                t.copy_(torch.randn_like(t))
    save_model(model, cfg, directory)
    if tokenizer is not None:
        tokenizer.save(directory)
    return cfg


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_export_then_import_gives_the_model_back(tmp_path, variant, tokenizer):
    cfg = make_model(tmp_path / "ours", variant, tokenizer)
    assert export_hf(tmp_path / "ours", tmp_path / "hf") == VARIANTS[variant][0]
    assert import_hf(tmp_path / "hf", tmp_path / "back") == cfg
    a, b = load_weights(tmp_path / "ours"), load_weights(tmp_path / "back")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    carried = Tokenizer.load(tmp_path / "back")
    assert carried.encode("the quick brown fox") == tokenizer.encode("the quick brown fox")
    assert carried.eos_id == tokenizer.eos_id
    exported = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert exported["architectures"] == [VARIANTS[variant][0]]
    assert exported["eos_token_id"] == tokenizer.eos_id and exported["bos_token_id"] is None
    generation = json.loads((tmp_path / "hf" / "generation_config.json").read_text())
    assert generation == {"eos_token_id": tokenizer.eos_id, "pad_token_id": tokenizer.pad_id}


def test_sharded_both_ways(tmp_path):
    make_model(tmp_path / "ours", "DeepseekV3ForCausalLM")
    export_hf(tmp_path / "ours", tmp_path / "hf", max_shard_bytes=40_000)
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    assert not (tmp_path / "hf" / "model.safetensors").exists()
    import_hf(tmp_path / "hf", tmp_path / "back", max_shard_bytes=40_000)
    assert len(ModelDir(tmp_path / "back").weight_files()) > 2
    a, b = load_weights(tmp_path / "ours"), load_weights(tmp_path / "back")
    assert all(torch.equal(a[k], b[k]) for k in a) and a.keys() == b.keys()


def test_dtypes_keep_routing_in_float32(tmp_path):
    make_model(tmp_path / "ours", "DeepseekV3ForCausalLM")  # a router and a selection bias
    export_hf(tmp_path / "ours", tmp_path / "hf", dtype="float16")
    stored = load_file(tmp_path / "hf" / "model.safetensors")
    assert stored["model.layers.1.mlp.gate.weight"].dtype == torch.float32
    assert stored["model.layers.1.mlp.gate.e_score_correction_bias"].dtype == torch.float32
    assert stored["model.layers.1.mlp.experts.0.up_proj.weight"].dtype == torch.float16
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["dtype"] == config["torch_dtype"] == "float16"
    import_hf(tmp_path / "hf", tmp_path / "bf16", dtype="bfloat16")
    weights = load_weights(tmp_path / "bf16")
    assert weights["layers.1.ffn.experts.w_up"].dtype == torch.bfloat16
    assert weights["layers.1.ffn.router.weight"].dtype == torch.float32
    assert weights["layers.1.ffn.router.selection_bias"].dtype == torch.float32
    with pytest.raises(ValueError, match="dtype='int8' is invalid"):
        import_hf(tmp_path / "hf", tmp_path / "int8", dtype="int8")


def edit_weights(directory, edit):
    path = directory / "model.safetensors"
    weights = load_file(path)
    edit(weights)
    save_file(weights, path, metadata={"format": "pt"})


def test_a_tensor_without_a_place_is_refused_by_name(tmp_path):
    make_model(tmp_path / "ours", "OlmoeForCausalLM")
    export_hf(tmp_path / "ours", tmp_path / "hf")
    edit_weights(tmp_path / "hf", lambda w: w.update({"model.layers.0.mlp.mystery.weight": torch.zeros(2)}))  # fmt: skip
    with pytest.raises(UnsupportedError, match=r"1 tensor.*mlp\.mystery.*refusing to drop them"):
        import_hf(tmp_path / "hf", tmp_path / "out")
    assert not (tmp_path / "out" / "config.json").exists()


def test_a_tensor_of_the_wrong_shape_is_refused_by_name(tmp_path):
    make_model(tmp_path / "ours", "MixtralForCausalLM")
    export_hf(tmp_path / "ours", tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    config["intermediate_size"] = 32
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        UnsupportedError, match=r"gives layers\.0\.ffn\.experts\.w_gate the shape \(4, 24, 32\)"
    ):
        import_hf(tmp_path / "hf", tmp_path / "out")
    assert not (tmp_path / "out" / "config.json").exists()


def test_deepseek_without_correction_bias_or_with_an_mtp_layer(tmp_path):
    cfg = make_model(tmp_path / "ours", "DeepseekV3ForCausalLM")
    export_hf(tmp_path / "ours", tmp_path / "hf")

    def edit(weights):
        for key in [k for k in weights if k.endswith("e_score_correction_bias")]:
            del weights[key]
        # A multi-token-prediction layer comes after the last decoder layer.
        weights[f"model.layers.{cfg.num_layers}.eh_proj.weight"] = torch.zeros(4, 4)

    edit_weights(tmp_path / "hf", edit)
    import_hf(tmp_path / "hf", tmp_path / "back")
    weights = load_weights(tmp_path / "back")
    assert torch.equal(weights["layers.1.ffn.router.selection_bias"], torch.zeros(8))
    assert not any(k.startswith(f"layers.{cfg.num_layers}.") for k in weights)


def test_an_unsupported_setting_writes_nothing(tmp_path):
    make_model(tmp_path / "ours", "MixtralForCausalLM")
    export_hf(tmp_path / "ours", tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    config["rope_parameters"] = {"rope_type": "longrope", "factor": 4.0, "rope_theta": 10000.0}
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedError, match=r"rope_parameters\.rope_type='longrope'"):
        import_hf(tmp_path / "hf", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_missing_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"has no config\.json"):
        import_hf(tmp_path / "nothing", tmp_path / "out")
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text(json.dumps(hf_config("MixtralForCausalLM")))
    with pytest.raises(FileNotFoundError, match=r"holds no model\.safetensors"):
        import_hf(tmp_path / "hf", tmp_path / "out")


def test_an_import_never_overwrites_a_model_or_a_run(tmp_path, tiny_model_dir):
    from moekit.interop.hf import export_hf, import_hf
    from moekit.model_dir import ModelDir

    export_hf(tiny_model_dir, tmp_path / "hf")
    with pytest.raises(ValueError, match="already holds a model"):
        import_hf(tmp_path / "hf", tiny_model_dir)
    run = tmp_path / "run"
    run.mkdir()
    (run / ModelDir.METRICS).write_text("")
    with pytest.raises(ValueError, match="holds a training run"):
        import_hf(tmp_path / "hf", run)
    assert sorted(p.name for p in run.iterdir()) == [ModelDir.METRICS]
