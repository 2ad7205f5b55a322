import itertools

import pytest

from moekit import build_model, get_preset
from moekit.training.config import TrainConfig
from moekit.training.optim import build_optimizer, build_scheduler, lr_factor, param_groups


def test_no_decay_on_norms_biases_and_embeddings():
    cfg = get_preset("debug")
    model = build_model(cfg)
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    decay_names = {names[id(p)] for p in decay["params"]}
    no_decay_names = {names[id(p)] for p in no_decay["params"]}
    assert "embed.weight" in no_decay_names
    assert all("norm" not in n for n in decay_names)
    assert {n for n in no_decay_names if "norm" in n} == {n for n in names.values() if "norm" in n}
    assert "layers.0.ffn.experts.w_up" in decay_names and "lm_head.weight" in decay_names
    assert "layers.0.ffn.router.weight" in decay_names
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert len(decay_names) + len(no_decay_names) == len(names)


def test_tied_head_does_not_decay():
    cfg = get_preset("debug")
    cfg.tie_embeddings = True
    model = build_model(cfg)
    _, no_decay = param_groups(model, 0.1)
    assert any(p is model.embed.weight for p in no_decay["params"])


def test_warmup_then_cosine():
    cfg = TrainConfig(max_steps=110, warmup_steps=10, min_lr_ratio=0.1, lr=1.0)
    assert lr_factor(0, cfg) == pytest.approx(0.1)
    assert lr_factor(9, cfg) == pytest.approx(1.0)
    assert lr_factor(10, cfg) == pytest.approx(1.0)
    assert lr_factor(60, cfg) == pytest.approx(0.55)
    assert lr_factor(110, cfg) == pytest.approx(0.1)
    assert lr_factor(500, cfg) == pytest.approx(0.1)
    factors = [lr_factor(s, cfg) for s in range(10, 111)]
    assert all(a >= b for a, b in itertools.pairwise(factors))


def test_scheduler_drives_the_optimizer():
    cfg = TrainConfig(max_steps=20, warmup_steps=4, lr=0.5)
    model = build_model(get_preset("debug"))
    opt = build_optimizer(model, cfg)
    sched = build_scheduler(opt, cfg)
    seen = []
    for _ in range(6):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen[:4] == pytest.approx([0.125, 0.25, 0.375, 0.5])
