import errno

import pytest
import torch

import moekit.training.checkpoint as ckpt
from moekit import build_model, get_preset
from moekit.files import DiskFullError
from moekit.model_dir import (
    ModelDir,
)
from moekit.training.config import TrainConfig
from moekit.training.optim import build_optimizer, build_scheduler


def live_state(seed=0):
    cfg = get_preset("debug")
    model = build_model(cfg, seed=seed)
    tc = TrainConfig(max_steps=10, warmup_steps=2)
    opt = build_optimizer(model, tc)
    sched = build_scheduler(opt, tc)
    out = model(torch.randint(0, cfg.vocab_size, (2, 8)))
    (out.logits.mean() + out.aux_loss).backward()
    opt.step()
    sched.step()
    return cfg, model, opt, sched


def test_checkpoint_round_trip(tmp_path):
    _cfg, model, opt, sched = live_state()
    ckpt.save_checkpoint(tmp_path, 3, model, opt, sched, {"loader": {"index": 5}}, keep_last=2)
    found = ckpt.latest_checkpoint(tmp_path)
    assert found is not None and found.step == 3 and found.state["loader"] == {"index": 5}
    _, model2, opt2, sched2 = live_state(seed=1)
    found.restore(model2, opt2, sched2)
    for (n, a), b in zip(model.state_dict().items(), model2.state_dict().values(), strict=True):
        assert torch.equal(a, b), n
    s1, s2 = opt.state_dict(), opt2.state_dict()
    for k in s1["state"]:
        for name in s1["state"][k]:
            assert torch.equal(s1["state"][k][name], s2["state"][k][name])
    assert sched2.state_dict()["last_epoch"] == sched.state_dict()["last_epoch"]


def test_keep_last(tmp_path):
    _, model, opt, sched = live_state()
    for step in (1, 2, 3, 4):
        ckpt.save_checkpoint(tmp_path, step, model, opt, sched, {}, keep_last=2)
    assert [p.name for p in ModelDir(tmp_path).checkpoints()] == ["step-00000003", "step-00000004"]
    assert ckpt.latest_checkpoint(tmp_path).step == 4


def test_a_crash_mid_write_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    _, model, opt, sched = live_state()
    ckpt.save_checkpoint(tmp_path, 1, model, opt, sched, {"tag": "first"}, keep_last=3)
    real_save = torch.save

    def crash(obj, path, *a, **k):
        real_save(obj, path, *a, **k)
        if str(path).endswith("optimizer.pt"):
            raise OSError("disk full (simulated)")

    monkeypatch.setattr(ckpt.torch, "save", crash)
    with pytest.raises(OSError, match="simulated"):
        ckpt.save_checkpoint(tmp_path, 2, model, opt, sched, {"tag": "second"}, keep_last=3)
    monkeypatch.undo()
    found = ckpt.latest_checkpoint(tmp_path)
    assert found.step == 1 and found.state["tag"] == "first"
    found.restore(*live_state()[1:])  # still loadable
    leftovers = [p.name for p in (tmp_path / "train_state").iterdir()]
    assert sorted(leftovers) == ["latest", "step-00000001"]


def test_a_full_disk_mid_checkpoint_is_named_and_keeps_the_previous_one(tmp_path, monkeypatch):
    _, model, opt, sched = live_state()
    ckpt.save_checkpoint(tmp_path, 1, model, opt, sched, {"tag": "first"}, keep_last=3)
    real_save = torch.save

    def full(obj, path, *a, **k):
        if str(path).endswith("optimizer.pt"):
            with open(path, "wb") as f:
                f.write(b"PK\x03\x04 half an optimizer")
            raise OSError(errno.ENOSPC, "No space left on device")
        real_save(obj, path, *a, **k)

    monkeypatch.setattr(ckpt.torch, "save", full)
    with pytest.raises(DiskFullError) as info:
        ckpt.save_checkpoint(tmp_path, 2, model, opt, sched, {"tag": "second"}, keep_last=3)
    monkeypatch.undo()
    final = tmp_path / "train_state" / "step-00000002"
    assert str(info.value).startswith(
        f"the disk is full: could not write the checkpoint of step 2 ({final}) (it needs about "
    )
    found = ckpt.latest_checkpoint(tmp_path)
    assert found.step == 1 and found.state["tag"] == "first"
    found.restore(*live_state()[1:])
    assert sorted(p.name for p in (tmp_path / "train_state").iterdir()) == [
        "latest",
        "step-00000001",
    ]


def damage(checkpoint, name):
    """Truncate one file of a checkpoint to half its size."""
    path = checkpoint / name
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize("name", ["model.safetensors", "optimizer.pt", "rng.pt"])
def test_a_corrupt_newest_checkpoint_falls_back_to_the_one_before(tmp_path, name):
    _, model, opt, sched = live_state()
    for step in (1, 2, 3):
        ckpt.save_checkpoint(tmp_path, step, model, opt, sched, {}, keep_last=3)
    root = tmp_path / "train_state"
    damage(root / "step-00000003", name)
    skipped = []
    found = ckpt.latest_checkpoint(tmp_path, on_skip=lambda path, why: skipped.append((path, why)))
    assert found.step == 2
    ((path, why),) = skipped
    assert path == root / "step-00000003"
    assert name in why and ("truncated or corrupt" in why)
    assert ckpt.newest_checkpoint(tmp_path).step == 3  # it is still there: the run exists
    found.restore(*live_state()[1:])


def test_no_usable_checkpoint_is_none(tmp_path):
    _, model, opt, sched = live_state()
    ckpt.save_checkpoint(tmp_path, 1, model, opt, sched, {}, keep_last=3)
    (tmp_path / "train_state" / "step-00000001" / "rng.pt").unlink()
    skipped = []
    assert ckpt.latest_checkpoint(tmp_path, on_skip=lambda p, why: skipped.append(why)) is None
    assert skipped == ["rng.pt is missing"]
