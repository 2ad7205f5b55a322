"""moekit.model_dir: the one owner of a model directory's file names and contents."""

import errno
import json
import os
import re
import stat
import time

import pytest
import torch

import moekit.model
from moekit import ModelDir, build_model, get_preset, load_model, save_model
from moekit.files import DiskFullError, umask
from moekit.model_dir import (
    FinetuneSummary,
    ShardWriter,
    load_weights,
    read_safetensors_header,
    save_weights,
    stored_tensors,
    weight_files,
)

from .conftest import disk_full_after


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


# ---- hostile model directories ------------------------------------------------------------------


@pytest.mark.parametrize("entry", ["../other/x.safetensors", "ABSOLUTE", "sub/x.safetensors", ".."])
def test_an_index_may_only_name_files_in_its_own_directory(tmp_path, entry):
    from moekit.analysis.doctor.weight_files import WeightFiles

    outside = tmp_path / "other"
    save_weights({"embed.weight": torch.ones(2)}, outside)
    (outside / "x.safetensors").write_bytes((outside / ModelDir.WEIGHTS).read_bytes())
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "x.safetensors").write_bytes((outside / ModelDir.WEIGHTS).read_bytes())
    if entry == "ABSOLUTE":
        entry = str(outside / "x.safetensors")
    d = ModelDir(tmp_path / "m")
    get_preset("debug").save(d.config_path)
    index = {"metadata": {}, "weight_map": {"embed.weight": entry}}
    (d / ModelDir.INDEX).write_text(json.dumps(index))
    message = rf"{ModelDir.INDEX} names '{re.escape(entry)}' for tensor 'embed.weight'"
    for read in (d.weight_files, d.load_weights, d.load_model, lambda: WeightFiles(d.path)):
        with pytest.raises(ValueError, match=message):
            read()


def test_an_index_that_is_not_a_mapping_is_refused(tmp_path):
    (tmp_path / ModelDir.INDEX).write_text('{"weight_map": ["model.safetensors"]}')
    with pytest.raises(ValueError, match=r"not a valid safetensors index \(weight_map is a list"):
        weight_files(tmp_path)


def test_a_config_that_does_not_fit_its_weights_is_refused_before_allocating(tmp_path, monkeypatch):
    cfg = get_preset("debug")
    save_model(build_model(cfg), cfg, tmp_path)
    config = json.loads((tmp_path / ModelDir.CONFIG).read_text())
    config["dim"] = 2**20  # some 26 TB of float32 parameters
    (tmp_path / ModelDir.CONFIG).write_text(json.dumps(config))

    def no_allocation(*args, **kwargs):
        raise AssertionError("the model was built before the weights were checked")

    monkeypatch.setattr(moekit.model, "build_model", no_allocation)
    with pytest.raises(ValueError) as info:
        load_model(tmp_path)
    message = str(info.value)
    assert message.startswith(f"{tmp_path / ModelDir.WEIGHTS} (with {tmp_path / ModelDir.CONFIG})")
    assert "does not fit the model config: shape mismatch: embed.weight: file (512, 64) vs " \
           "model (512, 1048576)" in message  # fmt: skip


def test_stored_tensors_come_from_the_headers_alone(tmp_path):
    save_weights({"a": torch.ones(2, 3), "b": torch.zeros(4, dtype=torch.bfloat16)}, tmp_path)
    stored = stored_tensors(tmp_path)
    assert {k: (t.dtype, t.shape) for k, t in stored.items()} == {
        "a": ("F32", (2, 3)),
        "b": ("BF16", (4,)),
    }
    path = tmp_path / ModelDir.WEIGHTS
    path.write_bytes(path.read_bytes() + b"\0")
    with pytest.raises(ValueError, match=r"holds \d+ bytes where its header describes"):
        read_safetensors_header(path)


def test_a_model_too_large_for_the_memory_is_refused_with_both_sizes(tmp_path, monkeypatch):
    cfg = get_preset("debug")
    save_model(build_model(cfg), cfg, tmp_path)
    monkeypatch.setattr(moekit.model, "available_memory", lambda device: 1_000_000)
    with pytest.raises(ValueError) as info:
        load_model(tmp_path)
    message = str(info.value)
    assert message.startswith(f"{tmp_path / ModelDir.CONFIG}: the model this config describes")
    assert (
        "has 386,368 parameters and needs 1.5 MB of memory, but cpu has 1.0 MB available" in message
    )
    with pytest.raises(ValueError, match="check the config's sizes"):
        build_model(cfg)
    monkeypatch.undo()
    assert moekit.model.available_memory(torch.device("cpu")) > 1_000_000


@pytest.mark.parametrize("layout", ["single", "sharded"])
def test_a_full_disk_leaves_the_earlier_weights_and_no_temporaries(tmp_path, monkeypatch, layout):
    cfg = get_preset("debug")
    before = build_model(cfg, seed=1)
    save_model(before, cfg, tmp_path)
    if layout == "sharded":
        save_weights(before.state_dict(), tmp_path, max_shard_bytes=200_000)
    listing = sorted(p.name for p in tmp_path.iterdir())
    disk_full_after(monkeypatch, files_written=2)
    with pytest.raises(DiskFullError) as info:
        save_weights(build_model(cfg, seed=2).state_dict(), tmp_path, max_shard_bytes=200_000)
    assert str(info.value).startswith(
        f"the disk is full: could not write the weights in {tmp_path}"
    )
    assert "it needs about" in str(info.value)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == listing
    for (name, a), b in zip(before.state_dict().items(), load_model(tmp_path).state_dict().values(),
                            strict=True):  # fmt: skip
        assert torch.equal(a, b), name


def test_a_full_disk_at_the_index_leaves_the_earlier_shards(tmp_path, monkeypatch):
    import pathlib

    first = {f"t{i}": torch.full((1000,), float(i)) for i in range(3)}
    save_weights(first, tmp_path, max_shard_bytes=5000)
    real_write_text = pathlib.Path.write_text

    def write_text(self, text, *args, **kwargs):
        if ModelDir.INDEX in self.name:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write_text(self, text, *args, **kwargs)

    monkeypatch.setattr(pathlib.Path, "write_text", write_text)
    with pytest.raises(
        DiskFullError, match=re.escape(f"could not write {tmp_path / ModelDir.INDEX}")
    ):
        save_weights({k: v + 1 for k, v in first.items()}, tmp_path, max_shard_bytes=5000)
    monkeypatch.undo()
    assert all(torch.equal(load_weights(tmp_path)[k], v) for k, v in first.items())
    assert not list(tmp_path.glob(".*"))


def test_a_full_disk_while_writing_the_config_keeps_the_old_one(tmp_path, monkeypatch):
    import pathlib

    cfg = get_preset("debug")
    ModelDir(tmp_path).save_config(cfg)
    real_write_text = pathlib.Path.write_text

    def write_text(self, text, *args, **kwargs):
        real_write_text(self, text[:10], *args, **kwargs)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(pathlib.Path, "write_text", write_text)
    other = get_preset("debug")
    other.dim = 128
    with pytest.raises(
        DiskFullError, match=re.escape(f"could not write {tmp_path / ModelDir.CONFIG}")
    ):
        ModelDir(tmp_path).save_config(other)
    monkeypatch.undo()
    assert ModelDir(tmp_path).config() == cfg
    assert os.listdir(tmp_path) == [ModelDir.CONFIG]


def test_writing_weights_removes_what_a_killed_writer_left(tmp_path):
    from moekit.files import STALE_AFTER_S

    left = [".tmpAb12Cd", ".model.safetensors.a1b2c3d4.tmp", ".part-00001.safetensors.tmp"]
    old = time.time() - 2 * STALE_AFTER_S
    for name in left:
        (tmp_path / name).write_bytes(b"\0" * 1000)  # model-sized, in real life
        os.utime(tmp_path / name, (old, old))
    save_weights({"a": torch.ones(3)}, tmp_path)
    assert os.listdir(tmp_path) == [ModelDir.WEIGHTS]
