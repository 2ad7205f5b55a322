"""The training report reads the trainer only through its protocol: a stand-in with those
attributes gets the whole report, with expert health by the one routing rule."""

import json
from types import SimpleNamespace

import torch

from moekit import build_model
from moekit.analysis.routing import load_stats
from moekit.data.tokenizer import Tokenizer
from moekit.training.config import resolve_run_config
from moekit.training.report import expert_load, write_training_report

from ..conftest import TINY_RUN


def stand_in(tmp_path, tiny_model_dir, *extra):
    cfg = resolve_run_config(preset="debug", overrides=[*TINY_RUN, *extra])
    gen = torch.Generator().manual_seed(0)
    rows = torch.randint(0, cfg.model.vocab_size, (12, cfg.train.seq_len + 1), generator=gen)
    metrics = [{"kind": "train", "step": s, "tokens": 128 * s, "loss": 5.0 - 0.1 * s}
               for s in (1, 2)]  # fmt: skip
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in metrics))
    trainer = SimpleNamespace(
        run_dir=tmp_path,
        model=build_model(cfg.model, seed=0),
        tokenizer=Tokenizer.load(tiny_model_dir),
        cfg=cfg,
        val_rows=rows[:8],
        data=SimpleNamespace(stats={"documents": 3}, train=rows),
        sample_prompts=["<b>def</b> "],
        method_line=lambda: None,
    )
    result = SimpleNamespace(step=2, tokens=256, seconds=1.5, val_loss=None, val_by_domain={},
                             skipped_steps=0)  # fmt: skip
    return trainer, result


def test_the_report_from_a_stand_in_trainer(tmp_path, tiny_model_dir):
    trainer, result = stand_in(tmp_path, tiny_model_dir, "train.eval_batches=1")
    out = write_training_report(trainer, result)
    summary = json.loads((out / "summary.json").read_text())
    # One eval batch of validation rows, recorded as inference routes them.
    inputs = trainer.val_rows[: trainer.cfg.train.batch_size, :-1]
    routed = trainer.model(inputs, causal_routing=True)
    for layer, stats in routed.moe_stats.items():
        rule = load_stats(stats.tokens_per_expert)
        assert summary["expert_load"][str(layer)] == rule.share
        assert summary["expert_health"][str(layer)] == {
            "imbalance": rule.imbalance, "dead": rule.dead, "nearly_dead": rule.nearly_dead
        }  # fmt: skip
    assert summary["steps"] == 2 and summary["data"] == {"documents": 3}
    assert "finetune" not in summary
    page = (out / "report.html").read_text()
    assert "<title>moekit training report</title>" in page
    assert f"<h1>Training report: {tmp_path}</h1>" in page
    for heading in ("Loss", "Expert load", "Samples (greedy)"):
        assert f">{heading}</h2>" in page
    assert page.count("data:image/png;base64,") == 2
    assert "&lt;b&gt;def&lt;/b&gt;" in page and "<b>def" not in page
    assert trainer.model.training  # measuring the load left the model as it was


def test_expert_load_falls_back_to_training_rows(tmp_path, tiny_model_dir):
    trainer, _ = stand_in(tmp_path, tiny_model_dir, "train.eval_batches=2")
    trainer.val_rows = trainer.val_rows[:0]
    load = expert_load(trainer)
    copies = 2 * trainer.cfg.train.batch_size * trainer.cfg.train.seq_len * 2  # top-2
    assert set(load) == {0, 1}
    assert all(sum(stats.tokens_per_expert) == copies for stats in load.values())
