"""One optimizer step and the validation loss, apart from any run."""

import math

import torch

from moekit import build_model
from moekit.config import ModelConfig
from moekit.data.loader import IGNORE_INDEX
from moekit.training.step import eval_loss, lm_loss, optimizer_step


def tiny(**moe):
    cfg = ModelConfig.from_dict(
        dict(vocab_size=64, dim=32, num_layers=2, num_heads=4, num_kv_heads=2, ffn_hidden=48,
             max_seq_len=32, moe=dict(num_experts=4, top_k=2, expert_hidden=16, **moe))
    )  # fmt: skip
    return build_model(cfg, seed=0)


def test_eval_loss_is_the_mean_over_targets_and_caps_its_batches():
    model = tiny().eval()
    rows = torch.randint(0, 64, (6, 9))
    with torch.no_grad():
        logits = model(rows[:, :-1], causal_routing=True).logits
        expected = float(lm_loss(logits, rows[:, 1:]))
        first = float(lm_loss(logits[:2], rows[:2, 1:]))
    assert math.isclose(eval_loss(model, rows, batch_size=6, max_batches=1), expected,
                        rel_tol=1e-5)  # fmt: skip
    assert math.isclose(eval_loss(model, rows, batch_size=2, max_batches=1), first, rel_tol=1e-5)
    none = torch.zeros(6, 9, dtype=torch.bool)  # no position is a target
    assert math.isnan(eval_loss(model, rows, none, batch_size=6, max_batches=1))


def test_router_balancing_follows_the_method():
    inputs = torch.randint(0, 64, (4, 8))
    targets = torch.randint(0, 64, (4, 8))
    targets[0] = IGNORE_INDEX
    moved = {}
    for balance in (True, False):
        model = tiny(score_func="sigmoid", bias_update_rate=0.1)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        record = optimizer_step(model, opt, [(inputs, targets)], grad_accum=1, grad_clip=1.0,
                                balance_routers=balance)  # fmt: skip
        assert record["finite"] and record["tokens"] == 32
        biases = [b for n, b in model.named_buffers() if n.endswith("selection_bias")]
        moved[balance] = any(b.abs().sum() > 0 for b in biases)
    assert moved == {True: True, False: False}
