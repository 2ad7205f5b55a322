"""moekit.model_dir: the one owner of a model directory's file names and contents."""

import json
import stat

import pytest
import torch

from moekit import ModelDir, build_model, get_preset, load_model, save_model
from moekit.files import umask
from moekit.model_dir import (
    FinetuneSummary,
    ShardWriter,
    load_weights,
    save_weights,
    weight_files,
)


def test_a_model_round_trips_through_its_directory(tmp_path):
    cfg = get_preset("debug")
    model = build_model(cfg, seed=3)
    d = ModelDir(tmp_path / "m")
    assert not d.is_model()
    save_model(model, cfg, d.path)
    assert d.is_model() and d.config() == cfg
    assert d.model_files() == [ModelDir.CONFIG, ModelDir.WEIGHTS]
    loaded = load_model(d.path)
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    mode = 0o666 & ~umask()
    assert stat.S_IMODE((d / ModelDir.WEIGHTS).stat().st_mode) == mode
    metadata = json.loads((d / ModelDir.WEIGHTS).read_bytes()[8:].split(b"}}", 1)[0] + b"}}")
    assert metadata["__metadata__"]["format"] == "pt"


def test_bf16_loading_keeps_routers_in_float32(tmp_path):
    cfg = get_preset("debug")
    save_model(build_model(cfg), cfg, tmp_path)
    model = ModelDir(tmp_path).load_model(dtype=torch.bfloat16)
    assert model.layers[0].attn_norm.weight.dtype == torch.bfloat16
    assert model.layers[0].ffn.router.weight.dtype == torch.float32


def test_missing_directories_and_overwrites_are_refused_by_name(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"finetune.base: .* is not a model directory"):
        ModelDir(tmp_path).require_model("finetune.base")
    with pytest.raises(FileNotFoundError, match="is not a model directory"):
        ModelDir(tmp_path).config()
    cfg = get_preset("debug")
    cfg.save(tmp_path / ModelDir.CONFIG)
    with pytest.raises(ValueError, match=r"already holds a model \(config.json\).*upcycling"):
        ModelDir(tmp_path).refuse_overwrite("upcycling")


def test_run_files(tmp_path):
    d = ModelDir(tmp_path)
    assert not d.has_run() and d.read_metrics() == [] and d.checkpoints() == []
    (tmp_path / ModelDir.METRICS).write_text('{"step": 1}\n{"step": 2}\n{"step": 3, "lo')
    assert d.has_run()
    assert [r["step"] for r in d.read_metrics()] == [1, 2]  # the torn last line is skipped
    for step in (20, 3):
        d.checkpoint_dir(step).mkdir(parents=True)
    assert [p.name for p in d.checkpoints()] == ["step-00000003", "step-00000020"]
    assert d.finetune_summary() is None
    summary = FinetuneSummary(method="esft", base="b", trainable_params=3, total_params=9,
                              trainable_fraction=1 / 3, targets=[], esft_experts={"1": [0, 2]})  # fmt: skip
    d.write_finetune_summary(summary)
    assert d.finetune_summary() == summary
    (tmp_path / ModelDir.FINETUNE).write_text("[1]")
    with pytest.raises(ValueError, match="not a JSON object"):
        d.finetune_summary()
    (tmp_path / ModelDir.FINETUNE).write_text('{"method": "lora"}')
    with pytest.raises(ValueError, match=r"finetune\.json: not a fine-tuning summary"):
        d.finetune_summary()


def test_tokenizer_files_travel_together(tmp_path):
    for name in (ModelDir.TOKENIZER, ModelDir.CHAT_TEMPLATE):
        (tmp_path / name).write_text("{}")
    assert [p.name for p in ModelDir(tmp_path).tokenizer_files()] == [
        ModelDir.TOKENIZER,
        ModelDir.CHAT_TEMPLATE,
    ]


def test_the_shard_writer_holds_one_shard_and_replaces_an_earlier_layout(tmp_path):
    tensors = {f"t{i}": torch.full((1000,), float(i)) for i in range(5)}  # 4 kB each
    (tmp_path / ModelDir.WEIGHTS).write_bytes(b"stale")
    writer = ShardWriter(tmp_path, max_shard_bytes=9000)
    for name, t in tensors.items():
        writer.add(name, t)
    with pytest.raises(ValueError, match="written twice"):
        writer.add("t0", tensors["t0"])
    written = writer.close()
    assert [p.name for p in written] == [
        "model-00001-of-00003.safetensors",
        "model-00002-of-00003.safetensors",
        "model-00003-of-00003.safetensors",
        ModelDir.INDEX,
    ]
    assert not (tmp_path / ModelDir.WEIGHTS).exists()
    assert len(weight_files(tmp_path)) == 3
    loaded = load_weights(tmp_path)
    assert all(torch.equal(loaded[k], v) for k, v in tensors.items())
    index = json.loads((tmp_path / ModelDir.INDEX).read_text())
    assert index["metadata"]["total_size"] == 5 * 4000
    assert not list(tmp_path.glob(".*"))  # no temporary parts left


def test_a_failed_shard_write_leaves_the_earlier_weights_and_no_parts(tmp_path):
    before = {"a": torch.ones(3)}
    (tmp_path / ".part-00003.safetensors.tmp").write_bytes(b"left by a killed writer")
    save_weights(before, tmp_path)
    with (
        pytest.raises(RuntimeError, match="conversion failed"),
        ShardWriter(tmp_path, max_shard_bytes=8) as writer,
    ):
        writer.add("b", torch.zeros(4))
        writer.add("c", torch.zeros(4))  # the first shard is on disk by now
        raise RuntimeError("conversion failed")
    assert sorted(p.name for p in tmp_path.iterdir()) == [ModelDir.WEIGHTS]
    assert torch.equal(load_weights(tmp_path)["a"], before["a"])
    with pytest.raises(ValueError, match="already closed"):
        writer.close()


def test_corrupt_or_truncated_weights_are_clear_errors(tmp_path):
    cfg = get_preset("debug")
    save_model(build_model(cfg), cfg, tmp_path)
    path = tmp_path / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        load_model(tmp_path)
    path.write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match=r"model\.safetensors is not a readable safetensors"):
        load_model(tmp_path)
    path.unlink()
    with pytest.raises(FileNotFoundError, match=r"no model\.safetensors"):
        load_model(tmp_path)


def test_weights_that_do_not_fit_the_config_are_named(tmp_path):
    cfg = get_preset("debug")
    save_model(build_model(cfg), cfg, tmp_path)
    cfg.moe.num_experts = 4
    cfg.save(tmp_path / "config.json")
    with pytest.raises(ValueError, match=r"shape mismatch: layers\.0\.ffn\.router\.weight"):
        load_model(tmp_path)


def test_sharded_weights_round_trip(tmp_path):
    cfg = get_preset("debug")
    model = build_model(cfg)
    save_model(model, cfg, tmp_path)
    save_weights(model.state_dict(), tmp_path, max_shard_bytes=200_000)
    files = weight_files(tmp_path)
    assert len(files) > 1 and not (tmp_path / "model.safetensors").exists()
    assert (tmp_path / "model.safetensors.index.json").exists()
    loaded = load_model(tmp_path)
    for (n, a), b in zip(model.state_dict().items(), loaded.state_dict().values(), strict=True):
        assert torch.equal(a, b), n
    # Saving unsharded again removes the shards.
    save_weights(model.state_dict(), tmp_path)
    assert weight_files(tmp_path) == [tmp_path / "model.safetensors"]
    assert set(load_weights(tmp_path)) == set(model.state_dict())


def test_loaders_follow_the_device_policy(tmp_path):
    cfg = get_preset("debug")
    save_model(build_model(cfg, device="auto"), cfg, tmp_path)
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert next(load_model(tmp_path, device="auto").parameters()).device.type == expected
    assert next(iter(load_weights(tmp_path, "auto").values())).device.type == expected
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            load_model(tmp_path, device="cuda")
